"""DSN parameters (RFC 3461) given to `fastmta serve` over SMTP: checked, kept, and obeyed in the notices.

A real client (aiosmtplib) sends NOTIFY/ORCPT/RET/ENVID to a real `fastmta serve`
child, which relays to a capturing `fastmta sink` that refuses some recipients;
the notices go to an aiosmtpd server (the sender's mail server), where they
are read with fastmta's own DSN parser and the standard library's.
"""

from __future__ import annotations

import asyncio
import email
import time
from pathlib import Path

import aiosmtplib
import pytest

from fastmta.feedback.dsn import parse_dsn
from fastmta.smtp.dsn_params import (
    DsnSyntaxError,
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_ret,
    xtext_decode,
    xtext_encode,
)
from serveproc import capture_sink, serve_config, served
from test_feedback_loop import _Receiver, _relay_config

MSG = (b"From: app@sender.example\r\nTo: x\r\nSubject: order 9\r\nMessage-ID: <o9@sender.example>\r\n\r\n"
       b"the body line\r\n")


@pytest.mark.parametrize(("value", "expected"), [
    (b"NEVER", "NEVER"), (b"never", "NEVER"), (b"DELAY,SUCCESS", "SUCCESS,DELAY"), (b"Failure", "FAILURE"),
    (b"FAILURE,FAILURE", "FAILURE"),  # taken, as Postfix takes it (found relaying from Postfix)
])
def test_notify_values(value: bytes, expected: str) -> None:
    assert parse_notify(value) == expected


@pytest.mark.parametrize("value", [None, b"", b"NEVER,SUCCESS", b"ALWAYS", b"SUCCESS,"])
def test_notify_refused(value: bytes | None) -> None:
    with pytest.raises(DsnSyntaxError):
        parse_notify(value)


def test_xtext_both_ways_and_the_printable_rule() -> None:
    assert xtext_decode(b"a+2Bb+3Dc", "ENVID") == "a+b=c"
    assert xtext_decode(xtext_encode("id 7=+x").encode(), "ENVID") == "id 7=+x"
    for bad in (b"a+0D+0Ab", b"a=b", b"a+2", b"a+GG", b"\xc3\xa9"):
        with pytest.raises(DsnSyntaxError):
            xtext_decode(bad, "ENVID")
    assert parse_orcpt(b"RFC822;Orig+2Bx@a.example") == "rfc822;Orig+x@a.example"
    assert parse_orcpt("utf-8;jö\\x{E9}@a.example".encode()) == "utf-8;jöé@a.example"
    for bad in (b"rfc822", b"rfc822;", b";a@b", b"rfc 822;a@b", b"rfc822;a+0A@b", b"utf-8;a\x01@b"):
        with pytest.raises(DsnSyntaxError):
            parse_orcpt(bad)
    assert parse_ret(b"hdrs") == "HDRS"
    with pytest.raises(DsnSyntaxError):
        parse_ret(b"BODY")
    with pytest.raises(DsnSyntaxError):
        parse_envid(b"x" * 1001)
    # What Postfix relays (found relaying from a real Postfix, whose bounces they became when refused):
    # an internationalized address's UTF-8 as xtext, and values longer than RFC 3461's limits.
    assert parse_orcpt(b"rfc822;g+C3+B6n+C3+AB2@dest.example") == "rfc822;g\u00f6n\u00eb2@dest.example"
    assert parse_envid(b"e" * 150) == "e" * 150 and len(parse_orcpt(b"rfc822;" + b"o" * 600 + b"@x")) == 609


async def _send(host: str, port: int, ehlo: bool, mail: list[str], rcpts: list[tuple[str, list[str]]]) -> list[int]:
    """One transaction; the codes of MAIL, each RCPT, and DATA (0: not reached)."""
    codes = []
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
        if ehlo:
            await smtp.ehlo()
            assert smtp.supports_extension("dsn")
        else:
            await smtp.helo()
        r = await smtp.execute_command(b"MAIL", b"FROM:<app@sender.example>", *(o.encode() for o in mail))
        codes.append(r.code)
        if r.code != 250:
            return codes
        for rcpt, options in rcpts:
            r = await smtp.execute_command(b"RCPT", f"TO:<{rcpt}>".encode(), *(o.encode() for o in options))
            codes.append(r.code)
        if 250 not in codes[1:]:
            await smtp.rset()
            return codes
        r = await smtp.data(MSG)
        codes.append(r.code)
    return codes


def test_notify_orcpt_ret_and_envid_are_obeyed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    receiver = _Receiver()
    try:
        with capture_sink(tmp_path / "capture", "--unknown-recipient", "gone*") as sink:
            cfg = _relay_config(tmp_path, data, receiver, sink)
            with served(cfg, data) as svc:
                host, port = svc.smtp

                async def go() -> list[list[int]]:
                    return [
                        await _send(host, port, True, ["RET=FULL", "ENVID=order+2B9"], [
                            ("gone1@dest.example", ["NOTIFY=NEVER"]),
                            ("gone2@dest.example", ["NOTIFY=FAILURE", "ORCPT=rfc822;Gone2+2Bx@dest.example"]),
                            ("ok1@dest.example", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;ok1@dest.example"]),
                            ("ok2@dest.example", []),  # no notice asked for a delivery: none
                            # The same recipient again (its first parameters stand): kept once, as Postfix's
                            # cleanup does; before, it went twice, one record each (found relaying from Postfix).
                            ("ok2@dest.example", ["NOTIFY=SUCCESS"]),
                            ("ok2@DEST.example", []),  # in another case: the same mailbox (an attack on serve)
                        ]),
                        # No parameters: the default (a failure notice, the headers only).
                        await _send(host, port, True, [], [("gone3@dest.example", [])]),
                        # NOTIFY=DELAY only: no failure notice.
                        await _send(host, port, True, [], [("gone4@dest.example", ["NOTIFY=DELAY"])]),
                        # Refused, each with what is wrong, and nothing of them queued.
                        await _send(host, port, True, ["RET=FULL", "RET=HDRS"], []),
                        await _send(host, port, True, ["ENVID=a=b"], []),
                        await _send(host, port, True, ["ENVID=a+0D+0AX-Evil:+201"], []),
                        await _send(host, port, True, [], [("gone5@dest.example", ["NOTIFY=NEVER,SUCCESS"]),
                                                           ("gone6@dest.example", ["ORCPT=rfc822;a+0Ab"])]),
                        await _send(host, port, False, ["RET=FULL"], []),  # HELO: no ESMTP parameters
                    ]

                codes = asyncio.run(go())
                records = svc.wait_accounting(lambda rs: len(rs) >= 6)
                deadline = time.monotonic() + 30
                while len(receiver.messages) < 3 and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(2.0)  # a notice that should not go has time to arrive
        assert codes[:3] == [[250, 250, 250, 250, 250, 250, 250, 250], [250, 250, 250], [250, 250, 250]]
        assert codes[3:] == [[501], [501], [501], [250, 501, 501], [555]]
        assert sorted((r["recipient"], r["status"]) for r in records) == [
            ("gone1@dest.example", "bounced"), ("gone2@dest.example", "bounced"), ("gone3@dest.example", "bounced"),
            ("gone4@dest.example", "bounced"), ("ok1@dest.example", "delivered"), ("ok2@dest.example", "delivered")]
        by_rcpt = {r["recipient"]: r for r in records}
        # The accounting line names the client's envelope id and this recipient's original address only.
        assert by_rcpt["gone2@dest.example"]["envid"] == "order+9"
        assert by_rcpt["gone2@dest.example"]["orcpt"] == "rfc822;Gone2+x@dest.example"
        assert "orcpt" not in by_rcpt["ok2@dest.example"] and all("dsn" not in r for r in records)

        notices = [email.message_from_bytes(m[2]) for m in receiver.messages]
        assert all(m[0] in ("", "<>") and m[1] == ["app@sender.example"] for m in receiver.messages)
        reports = {tuple(sorted((r.recipient, r.action) for r in parse_dsn(m[2]))): m[2] for m in receiver.messages}
        assert sorted(reports) == [
            (("gone2@dest.example", "failed"),), (("gone3@dest.example", "failed"),),
            (("ok1@dest.example", "relayed"),)], [n["Subject"] for n in notices]
        failed = reports[(("gone2@dest.example", "failed"),)]
        assert b"Original-Envelope-Id: order+9\r\n" in failed
        assert b"Original-Recipient: rfc822;Gone2+x@dest.example\r\n" in failed
        # RET=FULL: the whole message comes back, as a message/rfc822 part the library reads whole.
        returned = [p for p in email.message_from_bytes(failed).walk() if p.get_content_type() == "message/rfc822"]
        assert len(returned) == 1
        inner = returned[0].get_payload()[0]
        assert inner["Message-ID"] == "<o9@sender.example>" and inner.get_payload().strip() == "the body line"
        plain = reports[(("gone3@dest.example", "failed"),)]
        assert b"Content-Type: text/rfc822-headers" in plain and b"the body line" not in plain
        assert b"Original-Envelope-Id" not in plain and b"Original-Recipient" not in plain
        relayed = reports[(("ok1@dest.example", "relayed"),)]
        assert b"Subject: Successful Mail Delivery Report" in relayed and b"Status: 2.0.0" in relayed
        assert b"Original-Recipient: rfc822;ok1@dest.example" in relayed and b"the body line" not in relayed
    finally:
        receiver.close()


def test_http_callers_may_not_set_the_dsn_meta_key(tmp_path: Path) -> None:
    import hashlib
    import json
    import urllib.error
    import urllib.request

    data = tmp_path / "data"
    cfg = tmp_path / "fastmta.toml"
    cfg.write_text(serve_config(data, ("127.0.0.1", 9), tokens=[("app", hashlib.sha256(b"t0ken").hexdigest())]))
    with served(cfg, data) as svc:
        body = {"sender": "a@sender.example", "recipients": ["b@dest.example"], "content": "Subject: x\r\n\r\nhi\r\n",
                "meta": {"dsn": "NEVER"}}
        req = urllib.request.Request(f"{svc.http}/v1/messages", json.dumps(body).encode(),
                                     {"Authorization": "Bearer t0ken", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=20)
        assert err.value.code == 400 and "meta.dsn is reserved" in err.value.read().decode()


def test_the_parameters_go_on_to_a_next_hop_that_offers_dsn(tmp_path: Path) -> None:
    # Postfix's smtp-sink offers DSN (as Postfix does) and writes each transaction's MAIL and RCPT
    # arguments into its dump: what it got is what a real next hop would act on. A recipient that
    # asked NOTIFY=SUCCESS gets no "relayed" notice from us then: that hop reports the delivery.
    import tempfile

    from servers import postfix_smtp_sink

    data = tmp_path / "data"
    receiver = _Receiver()
    # smtp-sink writes as nobody, who cannot reach pytest's directories (mode 0700): one of its own.
    with tempfile.TemporaryDirectory(prefix="fastmta-dsn-") as where:
        dump = Path(where)
        dump.chmod(0o777)
        try:
            with postfix_smtp_sink("-d", f"{where}/%M.") as sink:
                cfg = _relay_config(tmp_path, data, receiver, sink.address)
                with served(cfg, data) as svc:
                    host, port = svc.smtp

                    async def go() -> list[int]:
                        return await _send(host, port, True, ["RET=HDRS", "ENVID=order+2B9"], [
                            ("ok1@dest.example", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Ok1+2Bx@dest.example"]),
                            ("ok2@dest.example", []),
                        ])

                    codes = asyncio.run(go())
                    records = svc.wait_accounting(lambda rs: len(rs) >= 2)
                    time.sleep(2.0)  # a notice that should not go has time to arrive
        finally:
            receiver.close()
        assert codes == [250, 250, 250, 250]
        assert sorted((r["recipient"], r["status"]) for r in records) == [
            ("ok1@dest.example", "delivered"), ("ok2@dest.example", "delivered")], records
        [dumped] = [p.read_bytes() for p in dump.iterdir()]
    args = [line for line in dumped.split(b"\n") if line.startswith((b"X-Mail-Args:", b"X-Rcpt-Args:"))]
    assert args[0].startswith(b"X-Mail-Args: <app@sender.example> ")  # after SIZE=, BODY=
    assert args[0].endswith(b" RET=HDRS ENVID=order+2B9")
    assert args[1:] == [b"X-Rcpt-Args: <ok1@dest.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Ok1+2Bx@dest.example",
                        b"X-Rcpt-Args: <ok2@dest.example>"]
    assert receiver.messages == []  # the next hop took the request: no "relayed" notice from us


def test_utf8_original_recipients_stay_ascii_in_notices_and_on_the_wire() -> None:
    # Found by review: a notice's message/delivery-status part printed "utf-8;rö@x" raw (8-bit in an ASCII
    # part), and an address escaped past RFC 3461's 500 characters would get a strict next hop's 501.
    from fastmta.smtp.dsn_params import address_field, envelope_dsn, orcpt_text

    assert orcpt_text("utf-8;rö@x.example") == "utf-8;r\\x{F6}@x.example"
    assert orcpt_text("rfc822;r+1@x.example") == "rfc822;r+1@x.example"  # RFC 3464 prints it as it is
    assert orcpt_text("rfc822;gön@x.example") == "utf-8;g\\x{F6}n@x.example"  # (as Postfix relays one)
    assert address_field("rö@x.example") == "utf-8; r\\x{F6}@x.example"  # a Final-Recipient too
    assert address_field("r@x.example") == "rfc822; r@x.example"
    meta = {"dsn": {"notify": {"a@x.example": "NEVER"}, "orcpt": {"a@x.example": "utf-8;" + "é" * 90 + "@x"}}}
    assert envelope_dsn(meta, ["a@x.example"]) == (b"", (b" NOTIFY=NEVER",))  # the NOTIFY goes, not the ORCPT


def test_success_notices_do_not_use_up_the_failures_allowance() -> None:
    # Found by review: with NOTIFY=SUCCESS on every message, 20 success notices in 10 minutes left the
    # sender's next failure notice unsent ("more than 20 notices").
    from fastmta.serve.auth import RelayPolicy
    from fastmta.serve.sender_notices import SenderNotices

    notices = SenderNotices(None, hostname="mx.test", policy=RelayPolicy([], []), store=None,  # type: ignore[arg-type]
                            per_sender=2)
    assert notices._allowed("app@sender.example", "relayed") is None
    assert notices._allowed("app@sender.example", "relayed") is None
    assert "more than 2 success notices" in (notices._allowed("app@sender.example", "relayed") or "")
    assert notices._allowed("app@sender.example", "failed") is None
    assert notices._allowed("app@sender.example", "delayed") is None
    assert notices._allowed("app@sender.example", "failed") is not None  # failures and delays share theirs


def test_what_goes_on_to_the_next_hop_keeps_to_rfc_3461() -> None:
    # Taken longer than the RFC allows (Postfix relays them), but never passed on so: a next hop holding
    # to the RFC would refuse the whole MAIL. And UTF-8 goes on as Postfix writes it, byte by byte.
    from fastmta.smtp.dsn_params import envelope_dsn

    meta = {"dsn": {"envid": "e" * 150, "orcpt": {"a@x.example": "rfc822;gön@x.example"}}}
    assert envelope_dsn(meta, ["a@x.example"]) == (b"", (b" ORCPT=rfc822;g+C3+B6n@x.example",))
