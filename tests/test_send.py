"""`fastmta send` end to end: spool directory -> engine -> a real sink process on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from fastmta.cli.sinkproc import embedded_sink
from fastmta.intake.pickup import read_pickup

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "src" / "fastmta" / "examples" / "spool"


def fastmta(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastmta", *args], capture_output=True, text=True, timeout=timeout)


def example_recipient_count() -> int:
    with open(EXAMPLE / "recipients.csv") as f:
        rows = sum(1 for _ in f) - 1
    pickups = sum(len(read_pickup(p).recipients) for p in EXAMPLE.glob("*.eml"))
    return rows + pickups


def test_readme_command_delivers_the_example_to_the_embedded_sink(tmp_path: Path) -> None:
    acct = tmp_path / "acct.jsonl"
    summary = tmp_path / "summary.json"
    out = fastmta("send", str(EXAMPLE), "--sink", "--accounting", str(acct), "--summary-json", str(summary))
    assert out.returncode == 0, out.stderr[-2000:]
    expected = example_recipient_count()
    assert expected >= 10_000
    lines = [json.loads(line) for line in acct.read_text().splitlines()]
    assert len(lines) == expected  # one accounting line per recipient
    assert {rec["status"] for rec in lines} == {"delivered"}
    assert len({rec["recipient"] for rec in lines}) == expected
    assert all(rec["code"] == 250 and rec["mx_ip"] == "127.0.0.1" for rec in lines)
    s = json.loads(summary.read_text())
    assert s["delivered"] == expected and s["unfinished"] == 0 and s["rejected"] == []
    assert "summary" in out.stdout and f"{expected:,}" in out.stdout
    domains = {rec["recipient"].rsplit("@", 1)[1] for rec in lines}
    assert len(domains) >= 100


def _public_key_record(pem_path: Path) -> bytes:
    text = pem_path.read_bytes()
    key = serialization.load_pem_private_key(text[text.index(b"-----BEGIN"):], None)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    import base64

    return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)


def small_campaign(spool: Path, rows: list[str], extra_toml: str = "") -> None:
    spool.mkdir()
    for name in ("welcome.txt", "welcome.html", "dkim-test-ed25519.key.pem"):
        shutil.copy(EXAMPLE / name, spool / name)
    toml = (EXAMPLE / "welcome.toml").read_text().replace('recipients = "recipients.csv"', 'recipients = "r.csv"')
    (spool / "welcome.toml").write_text(toml + extra_toml)
    (spool / "r.csv").write_text("email,first_name,last_name,id,signup\n" + "".join(r + "\n" for r in rows))


def test_campaign_messages_arrive_signed_and_personalized(world_writable_dir: Path, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    small_campaign(spool, [
        "ada@one.example,Ada,Lovelace,u1,2026-01-05",
        "nobody@two.example,,Smith,u2,2026-02-06",
        "grace@three.example,Grace,Hopper,u3,2026-03-07",
    ])
    capture = world_writable_dir
    with embedded_sink(["--capture", str(capture)]) as (host, port):
        out = fastmta("send", str(spool), "--relay", f"{host}:{port}", "--quiet")
    assert out.returncode == 0, out.stderr
    files = sorted(capture.glob("*.eml"))
    assert len(files) == 3
    record = _public_key_record(EXAMPLE / "dkim-test-ed25519.key.pem")

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"test2026._domainkey.news.fastmta.example."
        return record

    seen = {}
    for f in files:
        msg = read_pickup(f)
        assert msg.sender == "bounces@news.fastmta.example"
        assert dkim.verify(msg.content, dnsfunc=dnsfunc), f.name
        seen[msg.recipients[0]] = msg.content
    assert b"Subject: Welcome aboard, Ada!" in seen["ada@one.example"]
    assert b"Subject: Welcome aboard, friend!" in seen["nobody@two.example"]
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in seen["grace@three.example"]


@pytest.mark.parametrize("intake", ["process", "inline"])
def test_rsa_and_large_campaign_messages_signed_verify(world_writable_dir: Path, tmp_path: Path, intake: str) -> None:
    """Signed in the intake process, or (inline) RSA and large bodies on send's signing threads: all verify."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    spool = tmp_path / "spool"
    rows = [f"user{i}@d{i % 3}.example,Name{i},Last,u{i},2026-01-05" for i in range(40)]
    small_campaign(spool, rows)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (spool / "rsa.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    toml = (spool / "welcome.toml").read_text().replace("[template]", """[[dkim]]
domain = "news.fastmta.example"
selector = "rsa2026"
key_path = "rsa.pem"
algorithm = "rsa-sha256"

[template]""")
    (spool / "welcome.toml").write_text(toml)
    # A second job, Ed25519 only but with a ~100 KB HTML part: large enough to go to a thread on its own.
    (spool / "big.html").write_text((spool / "welcome.html").read_text().replace("</body>", "<p>long " * 14000
                                                                                  + "</body>"))
    (spool / "big.toml").write_text((EXAMPLE / "welcome.toml").read_text().replace(
        'recipients = "recipients.csv"', 'recipients = "big.csv"').replace(
        'id = "welcome-2026-11"', 'id = "big"').replace('html_file = "welcome.html"', 'html_file = "big.html"'))
    (spool / "big.csv").write_text("email,first_name,last_name,id,signup\n"
                                   + "".join(f"big{i}@d{i % 3}.example,B{i},L,b{i},2026-01-05\n" for i in range(20)))
    with embedded_sink(["--capture", str(world_writable_dir)]) as (host, port):
        out = fastmta("send", str(spool), "--relay", f"{host}:{port}", "--quiet", "--intake", intake)
    assert out.returncode == 0, out.stderr
    files = sorted(world_writable_dir.glob("*.eml"))
    assert len(files) == 60
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    import base64

    records = {b"rsa2026._domainkey.news.fastmta.example.": b"v=DKIM1; k=rsa; p=" + base64.b64encode(der),
               b"test2026._domainkey.news.fastmta.example.": _public_key_record(EXAMPLE / "dkim-test-ed25519.key.pem")}
    for f in files:
        msg = read_pickup(f)
        big = msg.recipients[0].startswith("big")
        signatures = [line for line in msg.content.split(b"\r\n") if line.lower().startswith(b"dkim-signature:")]
        assert len(signatures) == (1 if big else 2), f.name
        assert (len(msg.content) > 100_000) == big
        verifier = dkim.DKIM(msg.content)
        for i in range(len(signatures)):
            assert verifier.verify(idx=i, dnsfunc=lambda name, timeout=5: records[name]), (f.name, i)


def test_bad_input_is_reported_and_the_rest_delivered(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    small_campaign(spool, [
        "ok1@one.example,Ada,Lovelace,u1,2026-01-05",
        "broken-address,Bob,Broken,u2,2026-01-05",
        '"evil@two.example","Eve\r\nBcc: victim@x.example",Evil,u3,2026-01-05',
        "ok2@two.example,Grace,Hopper,u4,2026-01-05",
    ])
    # A template field the rows lack: only in a second job, which must fail per row.
    (spool / "second.toml").write_text(
        (spool / "welcome.toml").read_text().replace("Welcome aboard", "Hi {{ missing_field }}").replace(
            'id = "welcome-2026-11"', 'id = "second"'))
    (spool / "third.toml").write_text((spool / "welcome.toml").read_text() + "\n[extra]\nunknown_key = 1\n")
    (spool / "good.eml").write_bytes(b"X-Sender: a@b.example\r\nX-Receiver: c@d.example\r\nFrom: a@b.example\r\n\r\nhi\r\n")
    (spool / "bad.eml").write_bytes(b"this is not a message\r\n")
    (spool / "unreadable.eml").symlink_to(spool / "gone-away")  # a dangling link: cannot be read
    with embedded_sink() as (host, port):
        out = fastmta("send", str(spool), "--relay", f"{host}:{port}", "--quiet",
                      "--rejects", str(tmp_path / "rejects.jsonl"), "--accounting", str(tmp_path / "acct.jsonl"))
    assert out.returncode == 3, out.stderr
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    reasons = {(Path(r["file"]).name, r["line"]): r["reason"] for r in rejects}
    assert "not an RFC 5322 message" in reasons[("bad.eml", 1)]
    assert "cannot read" in reasons[("unreadable.eml", None)]
    assert "no local part or no domain" in reasons[("r.csv", 3)]
    # A quoted cell running over two lines: reported at its first line, with the lines it took; never sent.
    assert "lines 4-5" in reasons[("r.csv", 4)] and "holds a line break" in reasons[("r.csv", 4)]
    assert any(name == "third.toml" and "unknown key" in why for (name, _), why in reasons.items())
    missing = [why for (name, line), why in reasons.items() if "missing_field" in why]
    assert len(missing) == 2 and all("ok" in why for why in missing)  # names field and recipient
    delivered = [json.loads(line)["recipient"] for line in (tmp_path / "acct.jsonl").read_text().splitlines()]
    assert sorted(delivered) == ["c@d.example", "ok1@one.example", "ok2@two.example"]
    assert "rejected" in out.stdout


def test_a_capture_can_be_sent_again(world_writable_dir: Path, tmp_path: Path) -> None:
    first = world_writable_dir / "first"
    second = world_writable_dir / "second"
    with embedded_sink(["--capture", str(first)]) as (host, port):
        assert fastmta("send", str(EXAMPLE.parent / "spool"), "--relay", f"{host}:{port}", "--quiet",
                       "--queue-dir", str(tmp_path / "q1"), "--max-lifetime", "60").returncode == 0
    # Re-send only the pickup-shaped captures of the three pickup files.
    spool = tmp_path / "again"
    spool.mkdir()
    originals = {}
    for f in first.glob("*.eml"):
        msg = read_pickup(f)
        if msg.sender == "ops@fastmta.example":
            shutil.copy(f, spool / f.name)
            originals[tuple(msg.recipients)] = msg.content
    assert len(originals) == 3
    with embedded_sink(["--capture", str(second)]) as (host, port):
        assert fastmta("send", str(spool), "--relay", f"{host}:{port}", "--quiet",
                       "--queue-dir", str(tmp_path / "q2")).returncode == 0
    again = {tuple(read_pickup(f).recipients): read_pickup(f).content for f in second.glob("*.eml")}
    assert again == originals  # byte for byte, leading dots and 8-bit included


def test_csv_accounting_with_rotation(tmp_path: Path) -> None:
    import csv

    spool = tmp_path / "spool"
    small_campaign(spool, [f"user{i}@d{i % 3}.example,Ada,Lovelace,u{i},2026-01-05" for i in range(300)])
    acct_dir = tmp_path / "acct"
    with embedded_sink() as (host, port):
        out = fastmta("send", str(spool), "--relay", f"{host}:{port}", "--quiet",
                      "--accounting", str(acct_dir / "log.csv"), "--accounting-rotate-size", "20K")
    assert out.returncode == 0, out.stderr
    files = sorted(acct_dir.glob("*.csv"))
    assert len(files) > 1  # rotated
    rows = [row for f in files for row in csv.DictReader(f.open(newline=""))]
    assert len(rows) == 300 and {r["type"] for r in rows} == {"d"}
    assert {r["rcpt"] for r in rows} == {f"user{i}@d{i % 3}.example" for i in range(300)}
    assert {r["orig"] for r in rows} == {"bounces@news.fastmta.example"}
    assert all(r["dsnStatus"] == "2.0.0" and int(r["dlvSize"]) > 500 for r in rows)


@pytest.mark.parametrize("intake", ["process", "inline"])
def test_one_ctrl_c_stops_a_run_stuck_behind_a_full_queue(tmp_path: Path, intake: str) -> None:
    import signal
    import time

    from servers import free_port

    spool = tmp_path / "spool"
    small_campaign(spool, [f"user{i}@d.example,Ada,Lovelace,u{i},2026-01-05" for i in range(100)])
    config = tmp_path / "c.toml"
    config.write_text("[queue]\nmax_queued_recipients = 10\n[smtp]\ntls = \"never\"\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmta", "send", str(spool), "--relay", f"127.0.0.1:{free_port()}",
         "--config", str(config), "--queue-dir", str(tmp_path / "q"), "--quiet", "--intake", intake],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    time.sleep(3)  # the server is down: recipients wait, the queue fills, submits block
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: to the whole group, intake process included
    t0 = time.monotonic()
    _out, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 20, "one Ctrl-C must stop the run"
    assert proc.returncode == 1 and "did not reach a final state" in err
    assert "stopped reading the spool" not in err  # the intake process left the interrupt to its parent


def test_bad_bytes_spoil_only_their_own_row(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    small_campaign(spool, ["ok1@one.example,Ada,Lovelace,u1,2026-01-05", "ok2@one.example,Bob,B,u2,2026-01-05"])
    with open(spool / "r.csv", "ab") as f:
        f.write(b"bad\xff@one.example,Eve,E,u3,2026-01-05\nok3@one.example,C,C,u4,2026-01-05\n")
        # A quoted field that never ends swallows the rest of the file into one field: that record is
        # refused, reported at its first line with every line it took (they were once left unnamed).
        f.write(b'ok4@one.example,"unterminated,E,u5,2026-01-05\n' + b"x" * 100 + b"\n")
    with embedded_sink() as (host, port):
        cmd = ["send", str(spool), "--relay", f"{host}:{port}", "--quiet", "--queue-dir", str(tmp_path / "q"),
               "--summary-json", str(tmp_path / "s.json")]
        first = fastmta(*cmd)
        assert first.returncode == 3, first.stderr
        s1 = json.loads((tmp_path / "s.json").read_text())
        reasons = {r["line"]: r["reason"] for r in s1["rejected"]}
        assert s1["delivered"] == 3  # ok1, ok2 and ok3
        assert reasons[4] == "not valid UTF-8" and "lines 6-7" in reasons[6]
        # Every row was delivered or reported: a rerun has nothing left to do.
        second = fastmta(*cmd)
        s2 = json.loads((tmp_path / "s.json").read_text())
        assert second.returncode == 0 and s2["inputs_already_done"] == 1 and s2["delivered"] == 0
        # Said in the table too (only the JSON said it: "messages accepted 0" and nothing else).
        assert re.search(r"inputs already sent, skipped\W+1\b", second.stdout), second.stdout


def test_edits_send_exactly_the_new_rows(tmp_path: Path) -> None:
    # Inputs are known by content: touching a pickup file, renaming the spool
    # directory or appending rows to a finished campaign resends nothing old.
    spool = tmp_path / "spool"
    rows = [f"r{i}@one.example,R{i},L,u{i},2026-01-05" for i in range(400)]
    small_campaign(spool, rows + ["r3@one.example,Again,L,u3b,2026-01-05"])  # r3 twice: sent once, reported
    (spool / "note.eml").write_bytes(
        b"X-Sender: ops@fastmta.example\r\nX-Receiver: p1@p.example\r\nX-Receiver: p2@p.example\r\n"
        b"From: ops@fastmta.example\r\nSubject: note\r\n\r\nhi\r\n"
    )
    with embedded_sink() as (host, port):
        def send(directory: Path, n: int) -> tuple[int, dict[str, Any], list[str]]:
            acct = tmp_path / f"acct{n}.jsonl"
            out = fastmta("send", str(directory), "--relay", f"{host}:{port}", "--quiet", "--accounting", str(acct),
                          "--summary-json", str(tmp_path / f"s{n}.json"))
            delivered = [json.loads(x)["recipient"] for x in acct.read_text().splitlines()] if acct.exists() else []
            return out.returncode, json.loads((tmp_path / f"s{n}.json").read_text()), delivered

        code, s1, first = send(spool, 1)
        assert code == 3  # the repeated recipient is reported
        assert sorted(first) == sorted([f"r{i}@one.example" for i in range(400)] + ["p1@p.example", "p2@p.example"])
        assert any("duplicate recipient 'r3@one.example'" in r["reason"] for r in s1["rejected"])

        os.utime(spool / "note.eml")  # touch
        with open(spool / "r.csv", "a") as f:
            f.write("".join(f"n{i}@two.example,N{i},L,v{i},2026-02-01\n" for i in range(10)))
        moved = tmp_path / "renamed-spool"
        spool.rename(moved)  # its queue (.fastmta inside) moves with it
        code, s2, second = send(moved, 2)
        assert sorted(second) == [f"n{i}@two.example" for i in range(10)], second
        assert s2["delivered"] == 10


def test_a_full_queue_disk_stops_cleanly_and_resumes_when_space_is_back(tmp_path: Path, small_fs: Any) -> None:
    import subprocess

    disk = small_fs(1024 * 1024)  # a real 1 MB filesystem: the example needs several
    queue = disk / "queue"
    summary = tmp_path / "s.json"
    out = fastmta("send", str(EXAMPLE), "--sink", "--quiet", "--queue-dir", str(queue), "--summary-json", str(summary),
                  "--accounting", str(tmp_path / "a1.jsonl"))
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Task exception" not in out.stderr
    assert f"{queue}" in out.stderr and "No space left on device" in out.stderr
    assert out.stderr.count("fastmta send: stopped") == 1
    s = json.loads(summary.read_text())
    assert s["fatal"] and "No space left" in s["fatal"] and s["unfinished"] > 0
    # Space is back: the same command resumes, and every recipient is delivered.
    subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
    again = fastmta("send", str(EXAMPLE), "--sink", "--quiet", "--queue-dir", str(queue),
                    "--summary-json", str(summary), "--accounting", str(tmp_path / "a2.jsonl"))
    assert again.returncode == 0, again.stderr[-2000:]
    delivered = {json.loads(x)["recipient"] for n in (1, 2) for x in (tmp_path / f"a{n}.jsonl").read_text().splitlines()
                 if json.loads(x)["status"] == "delivered"}
    assert len(delivered) == example_recipient_count()


def test_a_read_only_queue_disk_is_one_clear_error(tmp_path: Path, small_fs: Any) -> None:
    import subprocess

    disk = small_fs(4 * 1024 * 1024)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    summary = tmp_path / "s.json"
    out = fastmta("send", str(EXAMPLE), "--sink", "--quiet", "--queue-dir", str(disk / "queue"),
                  "--summary-json", str(summary))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "Read-only file system" in out.stderr and str(disk) in out.stderr
    assert "Read-only" in json.loads(summary.read_text())["fatal"]


def test_accounting_names_the_source_and_the_session_s_tls(tmp_path: Path) -> None:
    """PowerMTA's vmta and dlvTls* fields, KumoMTA's egress_source and TLS ones: which source sent each
    recipient, and whether its session was encrypted (the sink offers STARTTLS unless told not to)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    for i in range(4):
        (spool / f"m{i}.eml").write_bytes(b"X-Sender: a@sender.example\r\nX-Receiver: r%d@dest.example\r\n"
                                          b"From: a@sender.example\r\nSubject: s\r\n\r\nbody\r\n" % i)
    cfg = tmp_path / "fastmta.toml"
    cfg.write_text('[[sources]]\nname = "blue"\naddress = "127.0.0.1"\nehlo_name = "blue.sender.example"\n')
    for flags, tls in (((), True), (("--no-starttls",), False)):
        acct = tmp_path / f"acct-{tls}.jsonl"
        with embedded_sink(flags) as (host, port):
            out = fastmta("send", str(spool), "--relay", f"{host}:{port}", "--quiet", "--config", str(cfg),
                          "--queue-dir", str(tmp_path / f"q-{tls}"), "--accounting", str(acct))
        assert out.returncode == 0, out.stderr[-2000:]
        records = [json.loads(x) for x in acct.read_text().splitlines()]
        assert len(records) == 4 and {r["status"] for r in records} == {"delivered"}
        assert {r["source"] for r in records} == {"blue"}
        if tls:
            assert {r["tls_version"] for r in records} <= {"TLSv1.2", "TLSv1.3"}
            assert all(r["tls_cipher"] for r in records)
        else:
            assert not any("tls_version" in r or "tls_cipher" in r for r in records)


def test_queue_and_accounting_are_private_by_default(tmp_path: Path) -> None:
    import stat

    queue, acct = tmp_path / "q", tmp_path / "acct.jsonl"
    with embedded_sink() as (host, port):
        out = fastmta("send", str(EXAMPLE), "--relay", f"{host}:{port}", "--quiet", "--queue-dir", str(queue),
                      "--accounting", str(acct))
        assert out.returncode == 0, out.stderr[-2000:]
        made = [queue, *queue.rglob("*"), acct]
        assert len(made) >= 4
        for path in made:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o077 == 0, f"{path} is {oct(mode)}"  # nothing for group or others
        # Configurable: --umask 027 lets a group read.
        out = fastmta("--umask", "027", "send", str(EXAMPLE), "--relay", f"{host}:{port}", "--quiet",
                      "--queue-dir", str(tmp_path / "q2"), "--accounting", str(tmp_path / "a2.jsonl"))
        assert out.returncode == 0
        assert stat.S_IMODE((tmp_path / "a2.jsonl").stat().st_mode) == 0o640
        assert stat.S_IMODE((tmp_path / "q2").stat().st_mode) == 0o750


def test_without_a_process_to_spare_the_spool_is_read_in_the_sending_process(tmp_path: Path) -> None:
    """fork() refused (EAGAIN: a process limit): said once, and everything is read, signed and sent inline."""
    spool = tmp_path / "spool"
    small_campaign(spool, [f"user{i}@d{i % 3}.example,Ada,Lovelace,u{i},2026-01-05" for i in range(30)])
    summary = tmp_path / "summary.json"
    script = ("import errno, os, sys\n"
              "def refused(): raise BlockingIOError(errno.EAGAIN, 'Resource temporarily unavailable')\n"
              "os.fork = refused\n"
              "from fastmta.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    out = subprocess.run([sys.executable, "-c", script, "send", str(spool), "--sink", "--summary-json", str(summary)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no intake process (Resource temporarily unavailable)" in out.stdout + out.stderr
    s = json.loads(summary.read_text())
    assert s["delivered"] == 30 and s["intake_error"] is None and s["intake_peak_rss_bytes"] is None


@pytest.mark.parametrize("intake", ["process", "inline"])
def test_pickup_files_whose_names_are_not_utf8(tmp_path: Path, intake: str) -> None:
    # Found by an attack on intake: a good file named b"good-\xff.eml" vanished (its record could not be
    # encoded, exit 0, nothing sent), and a malformed one made every run fail before anything was sent.
    # The names go on record escaped (\xff); the files are read by their real names.
    from servers import postfix_smtp_sink

    spool = tmp_path / "spool"
    spool.mkdir()

    def pickup(name: bytes, rcpt: str) -> None:
        with open(os.path.join(os.fsencode(spool), name), "wb") as f:
            f.write(f"X-Sender: a@b.example\r\nX-Receiver: {rcpt}\r\nFrom: a@b.example\r\n\r\nhi\r\n".encode())

    pickup(b"good-\xff.eml", "first@d.example")
    pickup(b"ok.eml", "second@d.example")
    with open(os.path.join(os.fsencode(spool), b"bad-\xfe.eml"), "wb") as f:
        f.write(b"this is not a message\r\n")
    acct, rejects = tmp_path / "acct.jsonl", tmp_path / "rejects.jsonl"
    with postfix_smtp_sink() as sink:
        for run in (1, 2):  # the second run sends nothing again and reports the bad file again (--rejects is per run)
            out = fastmta("send", str(spool), "--relay", f"{sink.host}:{sink.port}", "--quiet", "--intake", intake,
                          "--queue-dir", str(tmp_path / "queue"), "--rejects", str(rejects),
                          "--accounting", str(acct))
            assert out.returncode == 3, out.stderr[-2000:]
            assert "Traceback" not in out.stderr
            lines = [json.loads(line) for line in acct.read_text().splitlines()]
            assert sorted((r["recipient"], r["status"]) for r in lines) == [
                ("first@d.example", "delivered"), ("second@d.example", "delivered")], run
            assert {r["recipient"]: r.get("file") for r in lines}["first@d.example"] == "good-\\xff.eml"
            reported = [json.loads(line) for line in rejects.read_text().splitlines()]
            assert len(reported) == 1 and all(Path(r["file"]).name == "bad-\\xfe.eml" and r["line"] == 1
                                                and "not an RFC 5322 message" in r["reason"] for r in reported)


def test_a_full_accounting_disk_stops_the_run_and_nothing_is_sent_twice(
    tmp_path: Path, small_fs: Any, world_writable_dir: Path
) -> None:
    # Found by a fault-injection attack: with the accounting log's disk full, the journal batch of
    # states behind the failed accounting write was dropped (and outcomes after it were not journaled),
    # so the rerun sent ~300 of 8,000 recipients a second time. Now the states are journaled all the
    # same; the run stops naming the accounting log and the lines it may have lost.
    import re
    import subprocess
    from collections import Counter

    from servers import postfix_smtp_sink

    n = 3000
    spool = tmp_path / "spool"
    spool.mkdir()
    for i in range(n):
        (spool / f"m{i:05d}.eml").write_bytes(
            f"X-Sender: a@b.example\r\nX-Receiver: r{i}@d{i % 20}.example\r\nFrom: a@b.example\r\n"
            f"To: r{i}@d{i % 20}.example\r\nSubject: {i}\r\n\r\nhello {i}\r\n".encode())
    disk = small_fs(192 * 1024)  # room for some 700 accounting lines
    acct = disk / "acct.jsonl"
    summary = tmp_path / "s.json"
    with postfix_smtp_sink("-d", str(world_writable_dir) + "/%H%M%S.") as sink:
        cmd = ["send", str(spool), "--relay", f"{sink.host}:{sink.port}", "--quiet", "--queue-dir",
               str(tmp_path / "queue"), "--accounting", str(acct), "--summary-json", str(summary)]
        first = fastmta(*cmd)
        assert first.returncode == 1, first.stderr[-2000:]
        assert "Traceback" not in first.stderr and f"accounting log {acct}" in first.stderr
        s1 = json.loads(summary.read_text())
        assert "accounting log" in s1["fatal"] and "not written" in s1["fatal"] and s1["unfinished"] > 0
        # Every outcome missing from the log is counted (those after the failure were neither written
        # nor counted: 73 missing, "up to 60" said).
        logged = set()
        for line in acct.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                logged.add(json.loads(line)["recipient"])
        assert s1["delivered"] - len(logged) <= s1["accounting_unwritten"], (len(logged), s1["accounting_unwritten"])
        assert f"{s1['accounting_unwritten']:,} outcome(s) in all may have no line" in first.stderr
        subprocess.run(["mount", "-o", "remount,size=50m", str(disk)], check=True)
        again = fastmta(*cmd)
        assert again.returncode == 0, again.stderr[-2000:]
        s2 = json.loads(summary.read_text())
        assert s1["delivered"] + s2["delivered"] == n and s2["resumed_recipients"] == s1["unfinished"]
        # The table says where the delivered came from ("recipients 0" beside "delivered 1,394" did not).
        assert re.search(rf"resumed from the last run\W+{s2['resumed_recipients']:,}\b", again.stdout), again.stdout
    received = Counter(m.group(1) for f in world_writable_dir.iterdir()
                       if (m := re.search(rb"^To: (\S+)$", f.read_bytes(), re.M)))
    assert len(received) == n and set(received.values()) == {1}  # every recipient once: none twice


def test_queue_and_accounting_on_one_full_disk_end_with_a_summary(tmp_path: Path, small_fs: Any) -> None:
    # Found by a fault-injection attack: the engine's close flushed the accounting log unguarded, and
    # the run ended in a traceback, with no summary and no rejects file.
    spool = tmp_path / "spool"
    spool.mkdir()
    for i in range(2000):
        (spool / f"m{i:05d}.eml").write_bytes(
            f"X-Sender: a@b.example\r\nX-Receiver: r{i}@d{i % 20}.example\r\nFrom: a@b.example\r\n"
            f"Subject: {i}\r\n\r\nhello {i}\r\n".encode())
    disk = small_fs(1024 * 1024)
    with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):  # 40 KB left
        f.write(b"x" * (1024 * 1024 - 40 * 1024))
    summary = tmp_path / "s.json"
    with embedded_sink() as (host, port):
        out = fastmta("send", str(spool), "--relay", f"{host}:{port}", "--quiet", "--queue-dir", str(disk / "q"),
                      "--accounting", str(disk / "acct.jsonl"), "--summary-json", str(summary),
                      "--rejects", str(tmp_path / "rejects.jsonl"), "--intake", "inline")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert json.loads(summary.read_text())["fatal"] and (tmp_path / "rejects.jsonl").exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_start_up_stops_cleanly(tmp_path: Path, sig: str) -> None:
    # Found by a fault-injection attack: Ctrl-C in the first half second printed a KeyboardInterrupt
    # traceback, and SIGTERM killed the process silently (-15), before the run's handlers were set.
    # Whenever it lands, the run ends with a message and status 1, and the queue is usable.
    import signal
    import time

    spool = tmp_path / "spool"
    spool.mkdir()
    for i in range(300):
        (spool / f"m{i}.eml").write_bytes(f"X-Sender: a@b.example\r\nX-Receiver: r{i}@d.example\r\nSubject: {i}\r\n\r\nx\r\n".encode())
    with embedded_sink() as (host, port):
        for delay in (0.05, 0.25, 0.45):
            proc = subprocess.Popen(
                [sys.executable, "-m", "fastmta", "send", str(spool), "--relay", f"{host}:{port}", "--quiet",
                 "--queue-dir", str(tmp_path / "queue")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(delay)
            proc.send_signal(getattr(signal, sig))
            _, err = proc.communicate(timeout=120)
            # Finished before the signal came (a fast machine): 0 is fine too; a silent death by SIGTERM is not.
            # (Interrupted inside an import, CPython sometimes ends by SIGINT after the message: -2.)
            assert proc.returncode in (0, 1, -signal.SIGINT), (delay, proc.returncode, err[-1500:])
            assert "Traceback" not in err, (delay, err[-1500:])
            assert proc.returncode == 0 or "interrupt" in err, (delay, err[-1500:])
        again = fastmta("send", str(spool), "--relay", f"{host}:{port}", "--quiet", "--queue-dir", str(tmp_path / "queue"))
        assert again.returncode == 0, again.stderr[-1500:]


def test_bad_options_are_usage_errors_before_anything_is_sent(tmp_path: Path) -> None:
    # An operator's first hour: each of these gave a traceback (exit 1), after the whole run for the
    # last two, or ran with what nobody asked for ("127.0.0.1:" was port 25).
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "m.eml").write_bytes(b"X-Sender: a@s.example\r\nX-Receiver: b@d.example\r\nSubject: s\r\n\r\nx\r\n")
    for bad, words in ((["--relay", "127.0.0.1:0"], "bad port"), (["--relay", "127.0.0.1:99999"], "bad port"),
                       (["--relay", "127.0.0.1:"], "missing port"), (["--relay", "[::1]5"], "bad port"),
                       (["--max-lifetime", "0"], "--max-lifetime"),
                       (["--max-lifetime", "-5"], "--max-lifetime"),
                       (["--sink", "--rejects", str(tmp_path / "nodir" / "r.jsonl")], "--rejects"),
                       (["--sink", "--summary-json", str(tmp_path / "nodir" / "s.json")], "--summary-json")):
        out = fastmta("send", str(spool), "--quiet", "--queue-dir", str(tmp_path / "q"), *bad)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, (bad, out.stderr)
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").rglob("*.eml"))
    ok = fastmta("send", str(spool), "--sink", "--quiet", "--queue-dir", str(tmp_path / "q"), "--max-lifetime", "2h")
    assert ok.returncode == 0, ok.stderr


def test_an_interrupted_run_counts_its_campaign_kpis_after_the_last_delivery(tmp_path: Path) -> None:
    # The campaign KPIs of the summary were taken before close() finished the transactions in flight:
    # an interrupted run said "delivered 24", its campaign table "delivered 19".
    spool = tmp_path / "spool"
    small_campaign(spool, [f"r{i}@one.example,R,S,u{i},2026-01-05" for i in range(300)])
    with embedded_sink(["--delay", "eod:0.3"]) as (host, port):
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastmta", "send", str(spool), "--relay", f"{host}:{port}", "--quiet",
             "--queue-dir", str(tmp_path / "q"), "--summary-json", str(tmp_path / "s.json"), "--no-check"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not list((tmp_path / "q").glob("**/journal*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # some delivered, several in flight at the sink's 0.3 s end of data
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    summary = json.loads((tmp_path / "s.json").read_text())
    [campaign] = summary["guard"]["campaigns"]
    assert 0 < summary["delivered"] < 300 and campaign["delivered"] == summary["delivered"], (campaign, summary)
