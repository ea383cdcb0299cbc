"""Signed return paths (VERP) and the trace header, alone and in a campaign sent end to end."""

from __future__ import annotations

import base64
import email
import shutil
import subprocess
import sys
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from fastmta.cli.sinkproc import embedded_sink
from fastmta.examples import SPOOL
from fastmta.intake.pickup import read_pickup
from fastmta.message.returnpath import ReturnPath

SECRET = b"0123456789abcdef-test-secret"


def test_stable_short_unforgeable() -> None:
    rp = ReturnPath(SECRET, "Bounces.Example")
    a = rp.address("Welcome 2026/11!", "Ann@One.example")
    assert a == rp.address("Welcome 2026/11!", "ann@one.example")  # stable per recipient: greylisting stays happy
    assert a.endswith("@bounces.example") and len(a.partition("@")[0]) <= 64
    assert rp.address("welcome", "bob@one.example") != rp.address("welcome", "ann@one.example")
    assert rp.verify(a, "ann@one.example") == "welcome.2026.11"
    assert rp.verify(a, "bob@one.example") is None  # the mac binds the recipient
    assert ReturnPath(b"another-secret-of-16+", "bounces.example").verify(a, "ann@one.example") is None
    forged = a.replace(a[a.index("@") - 3 : a.index("@")], "aaa")
    assert rp.verify(forged, "ann@one.example") is None
    assert rp.verify("b-welcome-aaaaaaaaaaaaaaaa@elsewhere.example", "ann@one.example") is None
    token = rp.token("welcome", "ann@one.example")
    assert rp.verify(token, "ann@one.example") == "welcome"  # the trace header's value checks the same way
    assert len(rp.address("x" * 200, "a@b.example").partition("@")[0]) <= 64
    with pytest.raises(ValueError):
        ReturnPath(b"short", "bounces.example")


def _dns_record(key_path: Path) -> bytes:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)  # type: ignore[union-attr]
    return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)


def test_a_campaign_goes_out_with_signed_return_paths_and_trace(tmp_path: Path, world_writable_dir: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    for name in ("welcome.toml", "welcome.txt", "welcome.html", "dkim-test-ed25519.key.pem"):
        shutil.copy(SPOOL / name, spool / name)
    (spool / "recipients.csv").write_text(
        "email,first_name,last_name,id,signup\nann@one.example,Ann,L,u1,2026-01-01\nbob@two.example,Bob,R,u2,2026-01-01\n"
    )
    (tmp_path / "rp.key").write_bytes(SECRET)
    config = tmp_path / "fastmta.toml"
    config.write_text(f'[return_path]\ndomain = "bounces.fastmta.example"\nsecret_file = "{tmp_path / "rp.key"}"\n')
    with embedded_sink(["--capture", str(world_writable_dir)]) as (host, port):
        out = subprocess.run([sys.executable, "-m", "fastmta", "send", str(spool), "--relay", f"{host}:{port}",
                              "--config", str(config), "--quiet"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    rp = ReturnPath(SECRET, "bounces.fastmta.example")
    record = _dns_record(SPOOL / "dkim-test-ed25519.key.pem")
    seen = set()
    for f in world_writable_dir.glob("*.eml"):
        msg = read_pickup(f)
        [rcpt] = msg.recipients
        assert rp.verify(msg.sender, rcpt) == "welcome.2026.11", msg.sender
        head = msg.content.split(b"\r\n\r\n", 1)[0].decode()
        trace = next(line for line in head.split("\r\n") if line.startswith("X-Fastmta-Ref: "))
        assert rp.verify(trace.split(": ", 1)[1], rcpt) == "welcome.2026.11"
        signature = "".join(str(email.message_from_bytes(msg.content)["DKIM-Signature"]).split())
        h_tag = next(tag for tag in signature.split(";") if tag.startswith("h="))
        assert "x-fastmta-ref" in h_tag.lower() and "feedback-id" in h_tag.lower()
        assert dkim.verify(msg.content, dnsfunc=lambda name, timeout=5: record)  # the trace is covered
        seen.add(rcpt)
    assert seen == {"ann@one.example", "bob@two.example"}
    bad = tmp_path / "bad.toml"
    bad.write_text('[return_path]\ndomain = "bounces.fastmta.example"\nsecret_file = "/nonexistent/rp.key"\n')
    out = subprocess.run([sys.executable, "-m", "fastmta", "send", str(spool), "--sink", "--config", str(bad),
                          "--quiet"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "return_path" in out.stderr
