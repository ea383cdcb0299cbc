"""What came back, read as the service reads it (fastmta.feedback.inbound), and what the loop acts on.

Each case here was found by an attack with bounces and reports in formats the suite did not have:
the repo's own Exim and mail.ru bounces (sisimai's corpus, tests/data/corpora), and messages written
in the published formats of RFC 3464 / 6533 / 5965 / 6591 and Microsoft's JMRP.
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import pytest

from fastmta.feedback.classify import default_classifier
from fastmta.feedback.inbound import read_inbound
from fastmta.message.returnpath import ReturnPath
from fastmta.serve.feedback_loop import FeedbackLoop

CORPUS = Path(__file__).resolve().parent / "data" / "corpora" / "bounces" / "sisimai" / "eml"
RP = ReturnPath(b"inbound-test-secret-0123456789ab", "bounces.example.com")
R = "bob@example.net"


def dsn(status_part: str, ctype: str = "message/delivery-status", cte: str = "") -> bytes:
    return (
        "From: MAILER-DAEMON@mx.example.net\r\nSubject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n"
        "--B\r\nContent-Type: text/plain\r\n\r\nDelivery failed.\r\n\r\n"
        f"--B\r\nContent-Type: {ctype}\r\n{cte}\r\n{status_part}\r\n--B--\r\n"
    ).encode()


FIELDS = (f"Reporting-MTA: dns; mx.example.net\r\n\r\nFinal-Recipient: rfc822; {R}\r\nAction: failed\r\n"
          "Status: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 unknown user\r\n")


@pytest.mark.parametrize("name", ["lhost-exim-02.eml", "lhost-mailru-01.eml", "lhost-einsundeins-03.eml"])
def test_a_bounce_that_says_auto_replied_is_still_a_bounce(name: str) -> None:
    # Exim's bounces (and mail.ru's, GMX's) carry Auto-Submitted: auto-replied and are plain text:
    # they were recorded as auto-replies, so no bounce from them ever suppressed anything.
    from fastmta.feedback.dsn import parse_dsn

    raw = (CORPUS / name).read_bytes()
    first = parse_dsn(raw)[0]
    events = read_inbound(raw, "", [RP.address("spring", first.recipient)], return_path=RP)
    assert events[0].kind == "oob_bounce" and events[0].recipient == first.recipient and events[0].verified


def test_a_vacation_reply_is_still_an_auto_reply() -> None:
    raw = (b"From: Bob <bob@example.net>\r\nTo: news@shop.example.com\r\nAuto-Submitted: auto-replied\r\n"
           b"Subject: Out of office\r\n\r\nI am away; your mail is unavailable to me until Monday.\r\n")
    assert [e.kind for e in read_inbound(raw, "", [RP.address("spring", R)], return_path=RP)] == ["auto_reply"]
    # Outlook's, in German, says auto-generated and marks itself X-Auto-Response-Suppress.
    raw = ("From: Bob <bob@example.net>\r\nAuto-Submitted: auto-generated\r\nX-Auto-Response-Suppress: All\r\n"
           "Subject: Automatische Antwort: Spring sale\r\n\r\nIch bin nicht im B\u00fcro.\r\n").encode()
    assert [e.kind for e in read_inbound(raw, "", [], return_path=RP)] == ["auto_reply"]


def test_a_forwarded_recipient_is_matched_by_its_original_recipient() -> None:
    # Alias expansion at the receiver: Final-Recipient is the address the mail went on to.
    part = ("Reporting-MTA: dns; mx.example.net\r\n\r\nFinal-Recipient: rfc822; real.bob@int.example\r\n"
            f"Original-Recipient: rfc822;{R}\r\nAction: failed\r\nStatus: 5.1.1\r\n")
    [event] = read_inbound(dsn(part), "", [RP.address("spring", R)], return_path=RP)
    assert (event.kind, event.recipient, event.verified, event.bounce_type) == ("oob_bounce", R, True, "hard")


@pytest.mark.parametrize("sent, written", [
    ("bob+news@example.net", "bob+2Bnews@example.net"),
    ("g\u00f6n@example.net", "g+C3+B6n@example.net"),
    ("bob+2bnews@example.net", "bob+2bnews@example.net"),  # "+2b" in a real address is left as it is
])
def test_an_original_recipient_left_in_xtext_is_matched_decoded(sent: str, written: str) -> None:
    # Exim prints the ORCPT it was given as it came, xtext-encoded (RFC 3461 4.2 asks for it decoded):
    # an aliased recipient with a "+" or a non-ASCII letter was matched to nobody we sent to.
    part = ("Reporting-MTA: dns; mx.example.net\r\n\r\nFinal-Recipient: rfc822; real.bob@int.example\r\n"
            f"Original-Recipient: rfc822;{written}\r\nAction: failed\r\nStatus: 5.1.1\r\n")
    [event] = read_inbound(dsn(part, "message/global-delivery-status"), "", [RP.address("spring", sent)],
                           return_path=RP)
    assert (event.kind, event.recipient, event.verified, event.campaign) == ("oob_bounce", sent, True, "spring")
    # Decoded, it is only a guess the signed return path confirms: sent to someone else, nothing matches.
    [event] = read_inbound(dsn(part, "message/global-delivery-status"), "",
                           [RP.address("spring", "carol@example.net")], return_path=RP)
    assert not event.verified


@pytest.mark.parametrize("ctype, cte, body", [
    ("message/global-delivery-status", "", FIELDS),  # RFC 6533: the SMTPUTF8 bounce
    ("message/delivery-status", "Content-Transfer-Encoding: base64\r\n", base64.encodebytes(FIELDS.encode()).decode()),
])
def test_status_parts_of_every_type_and_encoding_keep_their_fields(ctype: str, cte: str, body: str) -> None:
    [event] = read_inbound(dsn(body, ctype, cte), "", [RP.address("spring", R)], return_path=RP)
    assert (event.kind, event.recipient, event.dsn_status, event.bounce_type) == ("oob_bounce", R, "5.1.1", "hard")


def test_an_internationalised_final_recipient_is_an_address() -> None:
    rcpt = "j\u00f6rg@m\u00fcller.example"
    part = f"Reporting-MTA: dns; mx.example.net\r\n\r\nFinal-Recipient: utf-8; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
    [event] = read_inbound(dsn(part, "message/global-delivery-status"), "", [RP.address("spring", rcpt)],
                           return_path=RP)
    assert (event.kind, event.recipient, event.dsn_status) == ("oob_bounce", rcpt, "5.1.1")


def test_a_bounce_naming_nobody_is_matched_through_the_returned_message() -> None:
    raw = ("From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.net>\r\nSubject: Undeliverable mail\r\n"
           "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n"
           "Your message could not be delivered: 550 5.1.1 User unknown.\r\n\r\n--B\r\nContent-Type: message/rfc822\r\n\r\n"
           f"From: news@shop.example.com\r\nTo: {R}\r\nSubject: Spring sale\r\n\r\nHello\r\n--B--\r\n").encode()
    [event] = read_inbound(raw, "", [RP.address("spring", R)], return_path=RP)
    assert (event.kind, event.recipient, event.verified, event.bounce_type) == ("oob_bounce", R, True, "hard")
    # Only our signed return path is believed: the same bounce to an address of no signature names nobody.
    assert [e.kind for e in read_inbound(raw, "", ["bounces@bounces.example.com"], return_path=RP)] == ["unrecognized"]


def test_a_header_that_is_not_ascii_does_not_stop_the_reading() -> None:
    raw = b"From: x@y.example\r\nAuto-Submitted: auto-r\xe9plied\r\nSubject: \xff\xfe\r\n\r\nhello\r\n"
    assert [e.kind for e in read_inbound(raw, "", [], return_path=RP)] == ["unrecognized"]


def test_a_long_diagnostic_is_read_in_linear_time() -> None:
    # A run of 200,000 characters without a space: the address pattern was quadratic in it (minutes;
    # a hostile MX's reply is classified inside the delivery path). The bound is ~100x the time taken.
    text = "550 5.1.1 <bob@example.net>: User unknown " + "x" * 200_000 + "@"
    started = time.perf_counter()
    c = default_classifier().classify_text(text)
    assert time.perf_counter() - started < 5.0
    assert c.bounce.value == "hard"


def _arf(fields: str, reported: str, frm: str = "feedback@arf.example.org", rtype: str = "message/rfc822") -> bytes:
    text = (f"From: {frm}\nTo: fbl@fbl.example.com\nSubject: report\nMIME-Version: 1.0\n"
            "Content-Type: multipart/report; report-type=feedback-report; boundary=A\n\n--A\nContent-Type: text/plain\n\n"
            f"report\n\n--A\nContent-Type: message/feedback-report\n\n{fields}\n--A\nContent-Type: {rtype}\n\n{reported}\n--A--\n")
    return text.replace("\n", "\r\n").encode()


def _reported(to: str) -> str:
    trace = RP.trace_header("spring", R).decode().replace("\r\n", "\n")  # what every campaign message carries
    return f"From: News <news@shop.example.com>\nTo: {to}\nSubject: Spring sale\nMessage-ID: <a1@shop.example.com>\n{trace}"


def test_complaints_are_mapped_and_suppress_and_an_authentication_report_does_not(tmp_path: Path) -> None:
    # Each case is checked for the suppression the loop records (None: none).
    cases = {
        # RFC 6591: about our DKIM/SPF, not the recipient's wish.
        "auth-failure": (_arf(f"Feedback-Type: auth-failure\nVersion: 1\nAuth-Failure: signature\nOriginal-Rcpt-To: {R}\n",
                              _reported(R), rtype="text/rfc822-headers"), None),
        # Microsoft's JMRP in ARF form: the recipient only in X-HmXmrOriginalRecipient.
        "jmrp": (_arf("Feedback-Type: abuse\nUser-Agent: Hotmail FBL\nVersion: 0.1\n",
                      f"X-HmXmrOriginalRecipient: <{R}>\n" + _reported("<redacted>") + "\nbody\n", frm="staff@hotmail.com"),
                 "domain:shop.example.com"),
        # Yahoo's and AOL's loops redact the recipient: the sealed trace still names (and the mac proves) them.
        "redacted": (_arf("Feedback-Type: abuse\nUser-Agent: Yahoo!-Mail-Feedback/2.0\nVersion: 1\n",
                          _reported("[redacted]") + "\nbody\n"), "domain:shop.example.com"),
        # The quoted message has no From: a suppression of the report's own domain blocked nothing.
        "no-from": (_arf(f"Feedback-Type: abuse\nVersion: 1\nOriginal-Rcpt-To: {R}\n",
                         _reported(R).replace("From: News <news@shop.example.com>\n", "") + "\nbody\n"), "global"),
    }

    async def main() -> None:
        for name, (raw, suppressed) in cases.items():
            data = tmp_path / name
            (data / "inbound").mkdir(parents=True)
            records: list[dict[str, object]] = []
            loop = FeedbackLoop(data, return_path=RP, emit=records.append)
            await loop.start()
            try:
                path = data / "inbound" / "m.eml"
                path.write_bytes(b"X-Fastmta-Envelope-From: <>\r\nX-Fastmta-Envelope-To: <fbl@fbl.example.com>\r\n" + raw)
                await loop.process(path)
            finally:
                await loop.close()
            [record] = records
            assert (record["status"], record["recipient"], record["verified"]) == ("complaint", R, True), name
            assert record.get("suppressed") == suppressed, (name, record)

    asyncio.run(main())


def test_a_sealed_recipient_opens_only_with_our_secret() -> None:
    sealed = RP.seal("Bob@Example.net")
    assert RP.unseal(sealed) == "bob@example.net" and RP.seal(R) == sealed  # stable per recipient
    other = ReturnPath(b"another-secret-0123456789abcdef", "bounces.example.com")
    assert other.unseal(sealed) is None and RP.unseal(sealed[:-2] + "AA") is None and RP.unseal("!!") is None
    assert "bob" not in sealed.lower()
