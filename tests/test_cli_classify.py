"""`fastmta classify` (reply lines and bounce messages -> JSON lines) and the
configuration's [classify] rules, as the engine loads them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fastmta.delivery.config import config_from_dict, load_config, parse_config
from fastmta.errors import ConfigError
from fastmta.feedback.classification import Category
from fastmta.feedback.classify import default_classifier
from fastmta.smtp.reply import ReplyParser

EML = Path(__file__).resolve().parent / "data" / "corpora" / "bounces" / "sisimai" / "eml" / "lhost-postfix-02.eml"

LINES = """\
550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in local recipient table

421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints
host mx.example.net[192.0.2.9] said: 552 5.2.2 Mailbox full (in reply to RCPT TO command)
550 5.4.5 Daily sending quota exceeded
"""

KEYS = {"input", "outcome", "category", "bounce", "scope", "phase", "rule", "retry_after", "code", "enhanced"}


def fastmta(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastmta", "classify", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def records(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def test_lines_on_stdin_give_one_json_line_each() -> None:
    run = fastmta(stdin=LINES)
    assert run.returncode == 0, run.stderr
    got = records(run.stdout)
    assert len(got) == 4  # the empty line is skipped
    assert all(set(r) >= KEYS for r in got)
    first, tss, full, quota = got
    assert (first["category"], first["bounce"], first["outcome"]) == ("invalid_recipient", "hard", "permanent")
    assert first["input"].startswith("550 5.1.1 <bob@example.com>") and first["line"] == 1
    assert (tss["category"], tss["scope"], tss["retry_after"]) == ("reputation_block", "site", 1800.0)
    assert tss["rule"] == "yahoo-tss-suspend" and tss["line"] == 3
    assert (full["phase"], full["category"], full["outcome"]) == ("rcpt", "mailbox_full", "transient")
    assert (quota["category"], quota["outcome"], quota["bounce"]) == ("rate_limited", "transient", "soft")


def test_phase_option_and_files(tmp_path: Path) -> None:
    f = tmp_path / "replies.txt"
    f.write_text("550 Unknown user\n", encoding="utf-8")
    got = records(fastmta("--phase", "end of DATA", str(f)).stdout)
    assert got == [dict(got[0], phase="eod", category="content_filtered", bounce="soft", file=str(f), line=1)]
    got = records(fastmta("--phase", "rcpt", str(f)).stdout)
    assert (got[0]["phase"], got[0]["category"], got[0]["bounce"]) == ("rcpt", "invalid_recipient", "hard")


def test_email_gives_one_line_per_recipient() -> None:
    run = fastmta("--email", str(EML))
    assert run.returncode == 0, run.stderr
    got = records(run.stdout)
    by_rcpt = {r["recipient"]: r for r in got}
    assert {"filtered@example.co.jp", "userunknown@example.co.jp"} <= set(by_rcpt)
    r = by_rcpt["userunknown@example.co.jp"]
    assert (r["action"], r["status"], r["category"], r["bounce"]) == ("failed", "5.1.1", "invalid_recipient", "hard")
    assert "User Unknown" in r["input"] and r["file"] == str(EML)


def test_help_documents_the_command() -> None:
    run = subprocess.run([sys.executable, "-m", "fastmta", "classify", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0
    for needle in ("JSON", "--email", "--phase", "--config", "--rules", "retry_after", "scope", "rule"):
        assert needle in run.stdout, needle
    top = subprocess.run([sys.executable, "-m", "fastmta", "--help"], capture_output=True, text=True, timeout=60)
    assert "classify" in top.stdout


CONFIG_RULES = """
[[rule]]
name = "acme-parked"
text = ['mailbox parked']
category = "inactive_mailbox"
"""


def test_config_and_rule_file_rules_are_used(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "acme.toml").write_text(CONFIG_RULES, encoding="utf-8")
    cfg = tmp_path / "fastmta.toml"
    cfg.write_text('[classify]\nrules = "rules/acme.toml"\n', encoding="utf-8")  # relative to the config file
    line = "550 mailbox parked by owner, user unknown\n"
    for opt in (["--config", str(cfg)], ["--rules", str(tmp_path / "rules" / "acme.toml")]):
        got = records(fastmta(*opt, stdin=line).stdout)
        assert (got[0]["rule"], got[0]["category"], got[0]["bounce"]) == ("acme-parked", "inactive_mailbox", "soft")
    assert records(fastmta(stdin=line).stdout)[0]["category"] == "invalid_recipient"


def test_bad_rules_are_a_usage_error(tmp_path: Path) -> None:
    cfg = tmp_path / "fastmta.toml"
    cfg.write_text('[classify]\nrules = [{ name = "oops", codes = ["550"], category = "nope" }]\n', encoding="utf-8")
    run = fastmta("--config", str(cfg), stdin="550 x\n")
    assert run.returncode == 2
    assert "oops" in run.stderr and "nope" in run.stderr
    run = fastmta(str(tmp_path / "missing.txt"))
    assert run.returncode == 2 and "cannot read" in run.stderr


# ------------------------------------------------------- [classify] in config


def _reply(raw: str) -> Any:
    return ReplyParser().feed((raw + "\r\n").encode())[0]


def test_config_classify_section_inline() -> None:
    config = config_from_dict({
        "classify": {
            "rules": [{"name": "acme-parked", "text": ["mailbox parked"], "category": "inactive_mailbox"}],
            "categories": {"greylisted": {"retry_after": 600}},
        }
    })
    cl = config.classify.classifier()
    assert cl.rule_names[0] == "acme-parked"
    assert cl.classify(_reply("550 mailbox parked"), "rcpt").category is Category.INACTIVE_MAILBOX
    assert cl.classify(_reply("451 4.7.1 Greylisted, please come back later"), "rcpt").retry_after == 600
    # No [classify]: the shared built-in classifier.
    assert config_from_dict({}).classify.classifier() is default_classifier()


def test_config_classify_rules_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "acme.toml").write_text(CONFIG_RULES, encoding="utf-8")
    (tmp_path / "fastmta.toml").write_text('[classify]\nrules = "acme.toml"\n', encoding="utf-8")
    config = load_config(tmp_path / "fastmta.toml")
    assert Path(str(config.classify.rules)).is_absolute()
    assert config.classify.classifier().rule_names[0] == "acme-parked"


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[classify]\nrules = "no-such-file.toml"\n', "cannot read"),
        ('[classify]\nrules = [{ name = "x", codes = ["550"], category = "policy", bounce = "hard" }]\n',
         "bounce 'hard' is not allowed"),
        ('[classify]\nhard_categories = ["invalid_recipient", "reputation_block"]\n', "reputation_block"),
        ('[classify]\nrulez = []\n', "classify.rulez"),
    ],
)
def test_config_classify_errors_at_load_time(toml: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(toml, "site.toml")
    assert needle in str(info.value) and "site.toml" in str(info.value)
