"""Hostile merge values: CR, LF, NUL, very long, non-ASCII, HTML metacharacters. Nothing gets through."""

from __future__ import annotations

import email
import email.policy
import html
from email.message import EmailMessage
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmta.message import core
from fastmta.message.dkim import DkimKeyConfig, DkimSigner, load_signing_key
from fastmta.message.headers import format_header
from fastmta.message.mime import compile_campaign

pytestmark = pytest.mark.core

SPEC = {
    "headers": {
        "From": "News <news@example.com>",
        "To": "{{ v }} <{{ email }}>",
        "Subject": "Offer for {{ v }}",
        "X-Campaign": "{{ v }}|{{ v }}",
    },
    "text": "text: {{ v }}\n",
    "html": "<p>{{ v }}</p>\n",
}
CAMPAIGN = compile_campaign(SPEC, source="inject.toml")

hostile = st.text(
    alphabet=st.sampled_from(list("\r\n\0<>&\"' \t=?.:abcé€🎉\u2028\x0b")) | st.characters(codec="utf-8"), max_size=120
) | st.builds(lambda n, c: c * n, st.integers(900, 3000), st.sampled_from(["x", "é", " ", "\r\n", "=?"]))


def sanitized(value: str) -> str:
    # Header values: every control character but TAB becomes a space.
    return "".join(" " if (ord(c) < 32 and c != "\t") or c == "\x7f" else c for c in value)


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


@settings(max_examples=150, deadline=None)
@given(hostile)
def test_no_header_injection_and_values_survive(value: str) -> None:
    raw = CAMPAIGN.render({"email": "r@example.net", "v": value})
    head, _, _ = raw.partition(b"\r\n\r\n")
    # Every header line is ours: field names are exactly the template's + generated ones.
    names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t")]
    assert names == [
        b"from", b"to", b"subject", b"x-campaign", b"date", b"message-id", b"mime-version", b"content-type"
    ]
    assert head.isascii() and all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    msg = parse(raw)
    # A reader gets the value back, control characters turned into spaces (runs of
    # spaces in headers are the reader's business: compare words).
    assert str(msg["Subject"]).split() == f"Offer for {sanitized(value)}".split()
    # Whatever the display name, the To header holds exactly the one address.
    assert [a.addr_spec for a in msg["To"].addresses] == ["r@example.net"]
    text = msg.get_body(("plain",))
    body = msg.get_body(("html",))
    assert text is not None and body is not None
    assert text.get_content().replace("\r\n", "\n") == core.normalize_crlf(f"text: {value}\n".encode()).decode().replace("\r\n", "\n")
    html_text = body.get_content().replace("\r\n", "\n")
    assert "<" not in html_text[3:-5] and html.unescape(html_text[3:-5]) == value.replace("\r\n", "\n").replace("\r", "\n")


@settings(max_examples=200)
@given(st.text(max_size=300), st.sampled_from(["Subject", "X-A-Very-Long-Header-Name-For-Folding", "To"]))
def test_format_header_round_trips(value: str, name: str) -> None:
    line = format_header(name, value)
    assert line.isascii() and line.endswith(b"\r\n")
    assert all(len(x) <= 998 for x in line.split(b"\r\n"))
    msg = parse(line + b"\r\n")
    assert len(msg.keys()) == 1
    if name == "Subject":
        decoded = str(msg[name])
        assert decoded.split() == sanitized(value).split()


@pytest.fixture(scope="module")
def signer_and_dns(tmp_path_factory: pytest.TempPathFactory) -> tuple[DkimSigner, dict[bytes, bytes]]:
    key = ed25519.Ed25519PrivateKey.generate()
    path: Path = tmp_path_factory.mktemp("k") / "ed.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    pub = key.public_key().public_bytes_raw()
    import base64

    dns = {b"s._domainkey.example.com.": b"v=DKIM1; k=ed25519; p=" + base64.b64encode(pub)}
    cfg = DkimKeyConfig(domain="example.com", selector="s", key_path=str(path), algorithm="ed25519-sha256")
    return DkimSigner([load_signing_key(cfg)]), dns


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile)
def test_rendered_and_signed_messages_verify(signer_and_dns: tuple[DkimSigner, dict[bytes, bytes]], value: str) -> None:
    signer, dns = signer_and_dns
    signed = signer.sign(CAMPAIGN.render({"email": "r@example.net", "v": value}))
    wire = core.to_wire(signed)
    # Undo dot-stuffing as the receiving server does, then verify.
    received = core.normalize_crlf(b"\r\n".join(line[1:] if line.startswith(b".") else line for line in wire[:-3].split(b"\r\n")))
    assert dkimpy.verify(received, dnsfunc=lambda name, timeout=5: dns.get(name))
