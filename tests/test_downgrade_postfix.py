"""An 8-bit message to a real server that does not offer 8BITMIME arrives converted, meaning kept.

The receiver is a private Postfix on loopback told not to offer 8BITMIME
(``smtpd_discard_ehlo_keywords``); it holds what it accepts, and ``postcat``
(Postfix's own tool) shows what arrived. Before the conversion fastmta sent
the 8-bit octets as they were (RFC 6152 3 forbids it: a 7-bit path may strip
the eighth bit or refuse the message).
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
from email.policy import compat32
from pathlib import Path

import pytest

from postfix_private import private_postfix
from test_send import fastmta

pytestmark = pytest.mark.interop

TEXT = "Gr\u00fc\u00dfe aus K\u00f6ln \u2014 na\u00efve caf\u00e9\r\n.a line that starts with a dot\r\n"
_OCTETS = bytes(b for b in range(1, 256) if b not in (10, 13)) * 4  # "binary", in lines: no NUL, no bare CR/LF
ATTACHMENT = b"\r\n".join(_OCTETS[i:i + 100] for i in range(0, len(_OCTETS), 100))
MESSAGE = (
    b"From: news@sender.example\r\nTo: a@rcv.example\r\nSubject: 8bit\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="=_b1"\r\n\r\n'
    b"--=_b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + TEXT.encode()
    + b"\r\n--=_b1\r\nContent-Type: text/plain\r\n\r\nplain ascii stays as it is\r\n"
    + b"\r\n--=_b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
    + ATTACHMENT
    + b"\r\n--=_b1--\r\n"
)


def decoded_parts(raw: bytes) -> list[tuple[str, bytes]]:
    msg = email.message_from_bytes(raw, policy=compat32)
    return [(p.get_content_type(), p.get_payload(decode=True).replace(b"\r\n", b"\n"))  # type: ignore[union-attr]
            for p in msg.walk() if not p.is_multipart()]


def held_message(pf: object) -> bytes:
    hold = Path(pf.queue_dir) / "hold"  # type: ignore[attr-defined]
    ids = [name for _dirpath, _dirs, files in os.walk(hold) for name in files]
    assert len(ids) == 1, ids
    postcat = shutil.which("postcat") or "/usr/sbin/postcat"
    out = subprocess.run([postcat, "-c", str(pf.config_dir), "-bh", "-q", ids[0]],  # type: ignore[attr-defined]
                         capture_output=True, timeout=30, check=True).stdout
    # postcat prints the header, then the body, with LF line ends; the first lines are our own Received.
    return out.replace(b"\n", b"\r\n")


def test_8bit_message_to_a_server_without_8bitmime_arrives_7bit_and_decodes_the_same(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "m.eml").write_bytes(b"X-Sender: news@sender.example\r\nX-Receiver: a@rcv.example\r\n" + MESSAGE)
    with private_postfix(None, hold=True, main_cf={
        "mydestination": "rcv.example",
        "smtpd_reject_unlisted_recipient": "no",
        "local_transport": "discard:delivered",
        "smtpd_discard_ehlo_keywords": "8bitmime",
    }) as pf:
        cfg = tmp_path / "fastmta.toml"
        cfg.write_text(f'[routing.static]\n"*" = ["{pf.host}:{pf.port}"]\n[smtp]\ntls = "never"\n')
        acct = tmp_path / "acct.jsonl"
        out = fastmta("send", str(spool), "--config", str(cfg), "--queue-dir", str(tmp_path / "q"),
                      "--accounting", str(acct), "--quiet", timeout=90)
        assert out.returncode == 0, out.stderr
        arrived = held_message(pf)
    assert [json.loads(line)["status"] for line in acct.read_text().splitlines()] == ["delivered"]
    headers_end = arrived.index(b"\r\n\r\n")
    assert arrived[headers_end:].isascii(), "8-bit octets reached a server that did not offer 8BITMIME"
    assert decoded_parts(arrived) == decoded_parts(MESSAGE)
    assert b"Content-Type: text/plain\r\n\r\nplain ascii stays as it is\r\n" in arrived
    assert b"Content-Transfer-Encoding: quoted-printable" in arrived
    assert b"Content-Transfer-Encoding: base64" in arrived
