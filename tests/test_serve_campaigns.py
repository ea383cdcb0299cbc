"""HTTP campaigns through `fastmta serve` get what pickup campaigns get: signed return path, trace, one-click headers, DKIM."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fastmta.message.returnpath import ReturnPath
from serveproc import capture_sink, captured, serve_config, served

pytestmark = pytest.mark.interop

SECRET = b"0123456789abcdef0123456789abcdef"
TOKEN = "campaign-test-token-0123456789"


def test_http_campaign_rows_get_return_path_unsubscribe_and_dkim(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (tmp_path / "rp.secret").write_bytes(SECRET)
    extra = (f'[return_path]\ndomain = "bounces.sender.example"\nsecret_file = "{tmp_path / "rp.secret"}"\n'
             '[unsubscribe]\nbase_url = "https://u.sender.example"\n'
             f'[[dkim]]\ndomain = "sender.example"\nselector = "s1"\nkey_file = "{tmp_path / "k.pem"}"\n')
    data = tmp_path / "data"
    with capture_sink(tmp_path / "capture") as sink:
        cfg = tmp_path / "fastmta.toml"
        cfg.write_text(serve_config(data, sink, extra=extra,
                                    tokens=[("t", hashlib.sha256(TOKEN.encode()).hexdigest())]))
        with served(cfg, data) as svc:
            body = {"sender": "news@sender.example", "campaign": "may2026",
                    "template": {"from": "News <news@sender.example>", "subject": "Hi {{ name }}", "text": "Hello"},
                    "recipients": [{"email": "ann@dest.example", "data": {"name": "Ann"}},
                                   {"email": "bob@dest.example", "data": {"name": "Bob"}}]}
            r = subprocess.run(["curl", "-s", "-H", f"Authorization: Bearer {TOKEN}", "-H",
                                "Content-Type: application/json", "-d", json.dumps(body), svc.http + "/v1/campaigns"],
                               capture_output=True, text=True, timeout=30)
            reply = json.loads(r.stdout)
            assert len(reply["accepted"]) == 2, reply
            svc.wait_accounting(lambda rs: sum(x["status"] == "delivered" for x in rs) >= 2)
    rp = ReturnPath(SECRET, "bounces.sender.example")
    msgs = captured(tmp_path / "capture")
    assert len(msgs) == 2
    for m in msgs:
        sender = re.search(rb"X-Sender: (\S+)", m).group(1).decode()
        rcpt = re.search(rb"X-Receiver: (\S+)", m).group(1).decode()
        assert rp.verify(sender, rcpt) == "may2026"  # the signed return path of this recipient
        assert b"X-Fastmta-Ref: " in m and b"Feedback-ID: may2026:fastmta:bulk:sender.example" in m
        assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in m
        content = m.split(b"\r\n", 2)[2]  # without the capture's envelope lines
        sig = re.search(rb"DKIM-Signature:(.*?)\r\n(?! )", content, re.S).group(1)
        signed = {h.strip().lower() for h in re.search(rb"h=([^;]+)", sig.replace(b"\r\n", b"")).group(1).split(b":")}
        assert {b"list-unsubscribe", b"list-unsubscribe-post", b"from"} <= signed

        def dns(name: bytes, timeout: int = 5) -> bytes:
            assert name == b"s1._domainkey.sender.example."
            return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public)

        assert dkim.verify(content, dnsfunc=dns)
