"""Complaint reports: RFC 5965 ARF and the older formats, on tests/data/corpora/arf."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastmta.feedback.arf import Complaint, parse_arf

CORPORA = Path(__file__).resolve().parent / "data" / "corpora"
ARF = CORPORA / "arf"


def test_arf_corpus() -> None:
    """Feedback type and recipients of every labelled report.

    Measured: feedback type 20/20, labelled recipients 23/23 found; 19/20
    reports with exactly the labelled set (sisimai_arf-12 names its
    recipient only in Removal-Recipient, which the label leaves out).
    """
    rows = [json.loads(line) for line in (ARF / "labels.jsonl").open(encoding="utf-8")]
    typed = type_ok = expected = found = exact = 0
    for row in rows:
        c = parse_arf((ARF / row["file"]).read_bytes())
        assert c is not None, row["file"]
        if row["expected_feedback_type"]:
            typed += 1
            type_ok += c.feedback_type == row["expected_feedback_type"]
        want = {a.lower() for a in row["expected_recipients"]}
        expected += len(want)
        found += len(want & set(c.recipients))
        exact += want == set(c.recipients)
    print(
        f"\nARF corpus: feedback type {type_ok}/{typed}; recipients {found}/{expected}; "
        f"exact recipient sets {exact}/{len(rows)}"
    )
    assert type_ok == typed
    assert found / expected >= 0.95
    assert exact / len(rows) >= 0.9


def test_rfc5965_maximal_example_fields() -> None:
    c = parse_arf((ARF / "eml" / "rfc5965_appendix_b2_maximal.eml").read_bytes())
    assert c == Complaint(
        feedback_type="abuse",
        recipients=("user@example.com",),
        original_rcpt_to=("user@example.com",),
        original_mail_from="somespammer@example.net",
        user_agent="SomeGenerator/1.0",
        version="1",
        arrival_date="Thu, 8 Mar 2005 14:00:00 EDT",
        source_ip="192.0.2.2",
        reported_domains=("example.net",),
        reported_uris=("http://example.net/earn_money.html", "mailto:user@example.com"),
        removal_recipients=("user@example.com",),
        message_id="8787KJKJ3K4J3K4J3K4J3.mail@example.net",
        fastmta_ref=None,
        reporter="abusedesk@example.com",
        source="arf",
    )


def test_older_formats() -> None:
    jmrp = parse_arf((ARF / "eml" / "sisimai_arf-22.eml").read_bytes())
    assert jmrp is not None
    assert (jmrp.source, jmrp.feedback_type, jmrp.recipients, jmrp.source_ip) == (
        "hotmail-jmrp", "abuse", ("kijitora@example.com",), "192.0.2.222"
    )  # fmt: skip
    ses = parse_arf((ARF / "eml" / "sisimai_lhost-amazonses-11.eml").read_bytes())
    assert ses is not None and (ses.source, ses.recipients) == ("amazonses", ("complaint@simulator.amazonses.com",))
    assert ses.original_mail_from == "kijitora@neko.example.jp"
    apple = parse_arf((ARF / "eml" / "sisimai_arf-26.eml").read_bytes())
    assert apple is not None and (apple.source, apple.feedback_type) == ("apple-unsubscribe", "opt-out")


REPORT = """From: FBL <fbl@isp.example>
To: abuse@sender.example
Subject: FW: hello
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="R"

--R
Content-Type: text/plain

This is an email abuse report for an email message received from IP 192.0.2.7.

--R
Content-Type: message/feedback-report

Feedback-Type: {ftype}
User-Agent: SomeFBL/2.0
Version: 1
Original-Mail-From: <bounces+abc@sender.example>
Original-Rcpt-To: <Bob@Example.NET>
Arrival-Date: Thu, 29 Apr 2024 23:34:45 +0000
Source-IP: 192.0.2.7
Reported-Domain: sender.example

--R
Content-Type: {original_type}

Message-ID: <m1.42@sender.example>
X-Fastmta-Ref: c=spring;r=7f3a
From: news@sender.example
To: bob@example.net
Subject: hello

--R--
"""


@pytest.mark.parametrize("original_type", ["message/rfc822", "text/rfc822-headers"])
@pytest.mark.parametrize("ftype", ["abuse", "fraud", "virus", "other", "not-spam"])
def test_trace_header_and_message_id(ftype: str, original_type: str) -> None:
    c = parse_arf(REPORT.format(ftype=ftype, original_type=original_type).encode())
    assert c is not None
    assert (c.feedback_type, c.recipients, c.original_mail_from) == (ftype, ("bob@example.net",), "bounces+abc@sender.example")
    assert (c.message_id, c.fastmta_ref) == ("<m1.42@sender.example>", "c=spring;r=7f3a")
    assert (c.source_ip, c.reported_domains, c.arrival_date) == ("192.0.2.7", ("sender.example",), "Thu, 29 Apr 2024 23:34:45 +0000")


def test_forwarded_report() -> None:
    inner = REPORT.format(ftype="abuse", original_type="message/rfc822").encode()
    outer = (
        b'From: postmaster@sender.example\nSubject: Fwd: FW: hello\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="O"\n\n'
        b"--O\nContent-Type: text/plain\n\nforwarding\n\n--O\nContent-Type: message/rfc822\n\n" + inner + b"\n--O--\n"
    )
    c = parse_arf(outer)
    assert c is not None and c.fastmta_ref == "c=spring;r=7f3a"


def test_bounces_and_garbage_are_not_complaints() -> None:
    bounces = sorted((CORPORA / "bounces" / "sisimai" / "eml").glob("lhost-*.eml"))
    assert bounces and all(parse_arf(p.read_bytes()) is None for p in bounces)
    for raw in (b"", b"garbage\x00\xff", b"Content-Type: multipart/report; report-type=feedback-report; boundary=x\n\n--x\n"):
        assert parse_arf(raw) is None
