"""What fastmta shows on a terminal cannot be steered by file names, columns or replies."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from fastmta.cli.terminal import SafeFormatter, safe_text

# No "/" in it: it is also a file name.
EVIL = "evil\x1b]0;pwned\x07\x1b[2J\u202e[link=https:attacker.example]click[bold]"


def test_safe_text_makes_controls_visible() -> None:
    shown = safe_text(EVIL)
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
    assert shown.startswith("evil\\x1b]0;pwned\\x07\\x1b[2J\\u202e[link=")
    assert safe_text("line1\nline2") == "line1\\x0aline2"


def test_log_lines_are_escaped() -> None:
    record = logging.LogRecord("fastmta.pool", logging.WARNING, __file__, 1, "reply %s", ("550 \x1b[2Jgone",), None)
    assert "\x1b" not in SafeFormatter("%(message)s").format(record)


def test_a_log_line_cannot_be_forged_and_a_traceback_keeps_its_lines() -> None:
    # A client's AUTH name (or a reply's text) with a newline, or a literal backslash-n: the text
    # formatter of serve turned the escaped "\n" back into a newline, so the name wrote a whole
    # log line of the attacker's ("... WARNING fastmta.serve: reload: admin token rotated").
    fmt = SafeFormatter("%(levelname)s %(name)s: %(message)s")
    for name in ("bob\n2026-12-07 WARNING fastmta.serve: forged", "bob\\n2026-12-07 WARNING fastmta.serve: forged"):
        record = logging.LogRecord("fastmta.serve", logging.WARNING, __file__, 1, "AUTH failed for %r", (name,), None)
        assert len(fmt.format(record).splitlines()) == 1, fmt.format(record)
    try:
        raise ValueError("bad\ninput")
    except ValueError:
        record = logging.LogRecord("fastmta.serve", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    lines = fmt.format(record).splitlines()
    assert lines[0] == "ERROR fastmta.serve: failed" and lines[1].startswith("Traceback")
    assert lines[-1] == "ValueError: bad\\x0ainput"
    # Another handler formatting the record first leaves its unescaped traceback on it (exc_text): not reused.
    record.exc_text = None
    logging.Formatter("%(message)s").format(record)
    assert record.exc_text and "bad\ninput" in record.exc_text
    assert fmt.format(record).splitlines()[-1] == "ValueError: bad\\x0ainput"


def test_send_shows_hostile_names_literally(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    # A pickup file whose name is an attack and whose content is rejected (no
    # envelope), so the name is printed; and a campaign whose CSV column names are markup.
    (spool / f"{EVIL}.eml").write_bytes(b"Subject: no envelope\r\n\r\nbody\r\n")
    (spool / "job.toml").write_text(
        '[campaign]\nid = "c"\nsender = "a@b.example"\nrecipients = "r.csv"\n'
        '[template]\ntext = "hi {{ x }}"\n[template.headers]\nFrom = "a@b.example"\nTo = "{{ email }}"\nSubject = "s"\n'
    )
    (spool / "r.csv").write_text("[bold]email[/bold],x\r\nann@one.example,1\r\n")
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "200"}  # rich believes it is a terminal
    out = subprocess.run(
        [sys.executable, "-m", "fastmta", "send", str(spool), "--sink", "--queue-dir", str(tmp_path / "q")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 3, out.stderr  # input rejected, nothing else wrong
    shown = out.stdout + out.stderr
    assert "\x1b]0;" not in shown and "\x1b[2J" not in shown and "\x07" not in shown and "\u202e" not in shown
    assert "\x1b]8;" not in shown  # no hyperlink escape made from [link=...]
    assert "[link=https:attacker.example]click[bold]" in shown  # shown literally
    assert "\\x1b]0;pwned" in shown
    assert "'email'" in shown  # the campaign's rows were rejected for want of the field, and said so
