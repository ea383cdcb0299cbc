"""DSN parsing: RFC 3464 delivery-status fields and prose bounces, on the
Sisimai and flufl.bounce corpora (tests/data/corpora/bounces), and the
rules that keep codes out of IP addresses and a bounce from reading as a
delivery."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from fastmta.feedback.classification import BounceType, Category, Outcome
from fastmta.feedback.dsn import DSNRecipient, classify_dsn, parse_dsn
from fastmta.feedback.dsn_codes import codes_in, enhanced_in, is_address, reply_code_in

BOUNCES = Path(__file__).resolve().parent / "data" / "corpora" / "bounces"

STANDARD_DSN = b"""From: MAILER-DAEMON@mx.example.org
To: sender@example.com
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

I'm sorry to have to inform you that your message could not be delivered.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; Bob@Example.NET
Original-Recipient: rfc822;bob@example.net
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.example.net
Diagnostic-Code: smtp; 550 5.1.1 <bob@example.net>: Recipient address
    rejected: User unknown in local recipient table

Final-Recipient: rfc822; carol@example.net
Action: delayed
Status: 4.2.2
Diagnostic-Code: smtp; 452 4.2.2 Mailbox full

--B--
"""


def test_standard_dsn_fields() -> None:
    recs = parse_dsn(STANDARD_DSN)
    assert [r.recipient for r in recs] == ["bob@example.net", "carol@example.net"]
    bob, carol = recs
    assert (bob.action, bob.status, bob.reply_code, bob.remote_mta) == ("failed", "5.1.1", 550, "mx.example.net")
    assert "User unknown in local recipient table" in bob.diagnostic  # folded line joined
    c = classify_dsn(bob)
    assert c.category is Category.INVALID_RECIPIENT and c.bounce is BounceType.HARD
    c = classify_dsn(carol)
    assert c.category is Category.MAILBOX_FULL and c.outcome is Outcome.TRANSIENT


def test_prose_bounce_fallback() -> None:
    raw = b"""From: MAILER-DAEMON@mail.example.org
To: sender@example.com
Subject: failure notice

Hi. This is the qmail-send program at mail.example.org.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<nobody@example.org>:
Sorry, no mailbox here by that name. (#5.1.1)
"""
    recs = parse_dsn(raw)
    assert [r.recipient for r in recs] == ["nobody@example.org"]
    assert not recs[0].standard
    assert classify_dsn(recs[0]).category is Category.INVALID_RECIPIENT


def _sisimai_labels() -> dict[str, list[dict[str, object]]]:
    labels = [json.loads(line) for line in (BOUNCES / "sisimai" / "labels.jsonl").open(encoding="utf-8")]
    by_file: dict[str, list[dict[str, object]]] = defaultdict(list)
    for lab in labels:
        if lab["category"] not in ("complaint", "auto_reply"):  # feedback reports and vacation replies are not bounces
            by_file[str(lab["file"])].append(lab)
    return by_file


def test_sisimai_bounce_messages() -> None:
    """Recipients found and status class (2/4/5) right, on every labelled bounce recipient.

    Before the format readers (prose fallback reading codes out of IP
    addresses): 277/320 found (86.6%), status class right for 210/277 (75.8%).
    Measured after: 319/320 (99.7%), 312/319 (97.8%). The one miss is labelled
    "kijitora@exampl", an address no part of its message holds; the class
    misses are label conventions (Sisimai's 4.0.947 for an Exim "retry timeout
    exceeded" failure, 5.x.x for reports that say "delayed").
    """
    total = found = classed = class_ok = cat = hs = 0
    for name, labs in _sisimai_labels().items():
        recs = {r.recipient: r for r in parse_dsn((BOUNCES / "sisimai" / name).read_bytes())}
        for lab in labs:
            total += 1
            rec = recs.get(str(lab["recipient"] or "").lower())
            if rec is None:
                continue
            found += 1
            if lab["status"]:
                classed += 1
                class_ok += rec.status_class == int(str(lab["status"])[0])
            c = classify_dsn(rec)
            cat += c.category.value == lab["category"]
            hs += c.bounce.value == lab["bounce_type"]
    print(
        f"\nDSN parsing on sisimai/eml: {total} labelled recipients, {found} found ({found / total:.1%}); "
        f"status class right {class_ok}/{classed} ({class_ok / classed:.1%}); "
        f"of those found, category {cat / found:.1%}, hard-vs-soft {hs / found:.1%}"
    )
    assert found / total >= 0.97
    assert class_ok / classed >= 0.95
    # Classification belongs to the reply classifier (its own tests); these
    # floors only catch a parser change that starves it (measured 78% / 89%).
    assert cat / found >= 0.70
    assert hs / found >= 0.82


def test_flufl_bounce_messages() -> None:
    rows = [json.loads(line) for line in (BOUNCES / "flufl" / "labels.jsonl").open(encoding="utf-8")]
    exact = 0
    for row in rows:
        expected = {a.lower() for a in row["expected_permanent"] + row["expected_temporary"]}
        got = {r.recipient for r in parse_dsn((BOUNCES / "flufl" / row["file"]).read_bytes())}
        exact += got == expected
    print(f"\nDSN parsing on flufl: {exact}/{len(rows)} messages with exactly the expected addresses")
    # 65/116 before the format readers, 106/116 after. Of the rest, flufl wants
    # the Original-Recipient where a DSN names both (the Sisimai labels want the
    # Final-Recipient, which `recipient` keeps; `original_recipient` has the other).
    assert exact / len(rows) >= 0.85


@pytest.mark.parametrize("raw", [b"", b"garbage\x00\xff", b"Content-Type: multipart/report; boundary=x\n\n--x\n"])
def test_garbage_gives_no_recipients_and_no_crash(raw: bytes) -> None:
    assert parse_dsn(raw) == []


# ---------------------------------------------------------------------------
# Codes never come out of IP addresses, versions, dates or message ids


@pytest.mark.parametrize(
    "text",
    [
        "192.0.2.222 does not like recipient.",
        "host mx.example.net [192.0.2.222]: connection refused",
        "Giving up on 203.0.113.225.",
        "by x6-mx6.smtp.example.org with neko2 (version 4.8.5.36) id 1509261695",
        "by mx.example.jp (Exim 4.72) with esmtp id 1P1ce6-000Egt-GZ",
        "by 10.142.148.12 with SMTP id v12mr7782689wfd.21.1286146171144; Sun, 03 Oct 2010 15:49:31 -0700",
        "Received: from [2001:db8::222] at 23:34:45 +0900 on 2014.11.23.08.42.52",
        "Message-ID: <4.2.2@host.example> In-Reply-To: <5.1.1.2@example.org>",
        "Size (in bytes): 222, retried for 450 seconds",
        "see https://postmaster.example.com/errors/#5.7.1 and ofr_506 [506]",
    ],
)
def test_no_code_is_read_from_ips_versions_dates_or_ids(text: str) -> None:
    assert codes_in(text, "245") == (None, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Remote host said: 550 5.1.1 <bob@example.net>... User unknown", (550, "5.1.1")),
        ("host mx.example.jp [192.0.2.153]: 550 5.1.1 <bob@example.jp>... User Unknown", (550, "5.1.1")),
        ("192.0.2.135 does not like recipient.\nRemote host said: 450 4.2.2 Mailbox Full", (450, "4.2.2")),
        ("Sorry, no mailbox here by that name. (#5.1.1)", (None, "5.1.1")),
        ("550-5.7.26 Unauthenticated email from example.jp is not accepted", (550, "5.7.26")),
        ("It responded as follows: [550 5.1.1 User unknown]", (550, "5.1.1")),
        ("ERROR_CODE :550, ERROR_CODE :5.1.1 <bob@example.co.jp>... User Unknown", (550, "5.1.1")),
        ("Remote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound'", (550, "5.1.10")),
        ("reason: 550 Host unknown", (550, None)),
        ("<<< 421 4.7.0 Try again later", (421, "4.7.0")),
    ],
)
def test_codes_read_where_replies_are_written(text: str, expected: tuple[int | None, str | None]) -> None:
    assert codes_in(text) == expected


def test_addresses() -> None:
    assert is_address("bob@example.org") and is_address("o'brien+tag@mail.example.co.jp")
    for bad in ("david...@gmail.com", "@mx.example.org", "|/usr/bin/procmail", "bob@localhost", ".bob@example.org", "kijitora"):
        assert not is_address(bad)
    assert enhanced_in("2.0.2.222 and 5.1.1.", "5") == "5.1.1"
    assert reply_code_in("<<< 250 2.1.5 Ok\n<<< 550 no such user") == 550  # a failure's code is never a 2xx


IP_PROSE_BOUNCE = b"""From: MAILER-DAEMON@mail.example.org
To: sender@example.com
Subject: failure notice

Hi. This is the qmail-send program at mail.example.org.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<bob@example.net>:
192.0.2.222 does not like recipient.
Giving up on 192.0.2.222.

<carol@example.net>:
203.0.113.25 does not like recipient.
Remote host said: 452 4.2.2 <carol@example.net>: Mailbox full
Giving up on 203.0.113.25.

--- Below this line is a copy of the message.

Received: from 192.0.2.250 by mail.example.org with SMTP; 29 Apr 2024 23:34:45 +0900
Message-ID: <2.0.2.222@example.com>
To: bob@example.net, carol@example.net
"""


def test_ip_address_in_prose_is_never_a_status() -> None:
    bob, carol = parse_dsn(IP_PROSE_BOUNCE)
    assert (bob.recipient, bob.status, bob.reply_code, bob.action) == ("bob@example.net", None, None, "failed")
    assert bob.status_class == 5  # what the report says: "a permanent error"
    assert (carol.status, carol.reply_code, carol.status_class) == ("4.2.2", 452, 4)
    assert classify_dsn(bob).outcome is Outcome.PERMANENT
    assert bob.source == "qmail" and not bob.standard


def _all_corpus_records() -> list[tuple[str, DSNRecipient]]:
    out = []
    for path in sorted((BOUNCES / "sisimai" / "eml").glob("*.eml")) + sorted((BOUNCES / "flufl" / "eml").glob("*.txt")):
        out.extend((path.name, r) for r in parse_dsn(path.read_bytes()))
    return out


def test_a_bounce_is_never_delivered() -> None:
    """Only a report that says so (Action: delivered/relayed/expanded, SES "Delivery") yields a 2.x.x or 2xx."""
    records = _all_corpus_records()
    assert len(records) > 400
    successes = []
    for name, r in records:
        two = (r.status or "").startswith("2") or (r.reply_code is not None and r.reply_code < 300)
        if r.success:
            successes.append(name)
            assert r.source in ("rfc3464", "rfc3464-text", "amazonses"), name  # never from prose
            assert not r.status or r.status.startswith("2"), name
        else:
            assert not two, (name, r)
            assert r.status_class in (4, 5, None), (name, r)
            assert classify_dsn(r).outcome is not Outcome.DELIVERED, (name, r)
    # The success notifications of the corpus stay distinguishable: Postfix's "deliverable" report, SES "Delivery".
    assert "rfc3464-28.eml" in successes and "lhost-amazonses-13.eml" in successes
    (ok,) = [r for n, r in records if n == "lhost-amazonses-13.eml"]
    assert (ok.action, ok.status, ok.status_class) == ("delivered", "2.6.0", 2)
    assert classify_dsn(ok).outcome is Outcome.DELIVERED


def test_a_failed_action_with_a_2xx_status_keeps_no_2xx() -> None:
    raw = STANDARD_DSN.replace(b"Status: 5.1.1", b"Status: 2.0.0").replace(b"550 5.1.1 <bob", b"250 2.0.0 <bob")
    bob = parse_dsn(raw)[0]
    assert (bob.action, bob.status, bob.reply_code, bob.status_class) == ("failed", None, None, 5)


def test_not_bounces_give_nothing() -> None:
    for path in [*(BOUNCES / "sisimai" / "eml_not_bounce").glob("*.eml"), *(BOUNCES / "sisimai" / "eml").glob("rfc3834-*.eml")]:
        assert parse_dsn(path.read_bytes()) == [], path.name
    for path in (BOUNCES.parent / "arf" / "eml").glob("*.eml"):  # complaints are not bounces
        assert parse_dsn(path.read_bytes()) == [], path.name


# ---------------------------------------------------------------------------
# RFC 3464 details and odd structures


def test_delivery_status_fields_and_fallbacks() -> None:
    raw = b"""From: MAILER-DAEMON@mx.example.org
Subject: Returned mail
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

The following addresses had permanent fatal errors.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org
Arrival-Date: Thu, 29 Apr 2024 23:34:45 +0900

Original-Recipient: rfc822;bob@example.net
Final-Recipient: rfc822;@relay.example.net:bob@server
Action: failed
Status: 5.2.0 (LMTP transmission failure)
Remote-MTA: dns; lmtp.example.net
Diagnostic-Code: smtp; 522 5.2.0 Delivery failed: Over quota
Last-Attempt-Date: Thu, 29 Apr 2024 23:40:00 +0900

Final-Recipient: rfc822; dave@example.net
Action: expanded
Status: 2.0.0

--B--
"""
    bob, dave = parse_dsn(raw)
    assert bob.recipient == "bob@example.net"  # a source-routed Final-Recipient gives way to the original
    assert (bob.status, bob.reply_code, bob.remote_mta, bob.reporting_mta) == ("5.2.0", 522, "lmtp.example.net", "mx.example.org")
    assert bob.last_attempt == "Thu, 29 Apr 2024 23:40:00 +0900" and bob.original_recipient == "bob@example.net"
    assert dave.success and dave.status == "2.0.0" and classify_dsn(dave).outcome is Outcome.DELIVERED


def _wrap(inner: bytes, *, subject: bytes = b"Fwd: Undelivered Mail Returned to Sender") -> bytes:
    return (
        b"From: alice@example.com\nTo: helpdesk@example.com\nSubject: " + subject + b"\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="F"\n\n--F\nContent-Type: text/plain\n\nSee the attached bounce.\n\n'
        b"--F\nContent-Type: message/rfc822\n\n" + inner + b"\n--F--\n"
    )


def test_forwarded_bounces_are_read_through() -> None:
    attached = parse_dsn(_wrap(STANDARD_DSN))
    assert [r.recipient for r in attached] == ["bob@example.net", "carol@example.net"]
    quoted = b"From: alice@example.com\nSubject: Fwd: failure notice\n\nBegin forwarded message:\n\n" + b"\n".join(
        b"> " + line for line in IP_PROSE_BOUNCE.split(b"\n")
    )
    assert [r.recipient for r in parse_dsn(quoted)] == ["bob@example.net", "carol@example.net"]
    # The original a bounce returns is never read as a bounce.
    returned = _wrap(b"From: bob@example.net\nSubject: hello\n\nI could not be delivered to carol@example.net: unknown")
    assert parse_dsn(returned.replace(b"Fwd: Undelivered Mail Returned to Sender", b"Lunch")) == []


def test_mbox_of_two_bounces() -> None:
    two = STANDARD_DSN + b"\nFrom MAILER-DAEMON  Thu Apr 29 23:34:45 2024\n" + IP_PROSE_BOUNCE
    assert [r.recipient for r in parse_dsn(two)] == ["bob@example.net", "carol@example.net"]  # one record per address


# ---------------------------------------------------------------------------
# Prose families without a sample in the corpora (texts of the MTAs' templates)


def _notice(body: str, subject: str = "Mail delivery failed", ctype: str = "text/plain") -> bytes:
    head = f"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\nTo: sender@example.com\nSubject: {subject}\n"
    return (head + f"MIME-Version: 1.0\nContent-Type: {ctype}; charset=utf-8\n\n" + body).encode()


def test_exim_delay_warning() -> None:
    (rec,) = parse_dsn(
        _notice(
            "This message was created automatically by mail delivery software.\n\n"
            "A message that you sent has not yet been delivered to one or more of its\n"
            "recipients after more than 24 hours on the queue on mx.example.org.\n\n"
            "The message identifier is:     1P1ce6-000Egt-GZ\n\n"
            "The address to which the message has not yet been delivered is:\n\n"
            "  bob@example.net\n"
            "    host mx.example.net [192.0.2.25]: 451 4.3.0 Temporary lookup failure\n"
            "    Delay reason: SMTP error from remote mail server after RCPT TO:<bob@example.net>\n\n"
            "No action is required on your part.\n",
            "Warning: message 1P1ce6-000Egt-GZ delayed 24 hours",
        )
    )
    assert (rec.recipient, rec.action, rec.reply_code, rec.status, rec.source) == ("bob@example.net", "delayed", 451, "4.3.0", "exim")


def test_postfix_prose_without_delivery_status() -> None:
    (rec,) = parse_dsn(
        _notice(
            "This is the mail system at host mx.example.org.\n\n"
            "####################################################################\n"
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
            "####################################################################\n\n"
            "Your message could not be delivered for more than 4 hour(s).\n\n"
            "<bob@example.net>: connect to mx.example.net[192.0.2.25]:25: Connection timed out\n",
            "Delayed Mail (still being retried)",
        )
    )
    assert (rec.action, rec.status, rec.reply_code, rec.status_class) == ("delayed", None, None, 4)


def test_office365_html_only() -> None:
    html = (
        "<html><body><p><b>Delivery has failed to these recipients or groups:</b></p>"
        "<p><a href='mailto:bob@example.net'>bob@example.net</a><br></p>"
        "<p>The email address wasn&#8217;t found at the destination domain.</p>"
        "<p><b>Diagnostic information for administrators:</b></p><p>Generating server: AM0PR01MB1234.eurprd01.prod.outlook.com<br>"
        "<br>bob@example.net<br>Remote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found'<br></p>"
        "<p>Original message headers:</p><pre>Received: from AM0PR01MB1234 (192.0.2.3) by AM0PR01MB5678 (192.0.2.4)</pre>"
    )
    (rec,) = parse_dsn(_notice(html, "Undeliverable: hello", "text/html"))
    assert (rec.recipient, rec.reply_code, rec.status, rec.source) == ("bob@example.net", 550, "5.1.10", "exchange")


def test_domino() -> None:
    (rec,) = parse_dsn(
        _notice(
            "Your message\n\n  Subject: hello\n\nwas not delivered to:\n\n  bob@example.net\n\n"
            "because:\n\n  User bob (bob@example.net) not listed in Domino Directory\n",
            "DELIVERY FAILURE: User bob (bob@example.net) not listed in Domino Directory",
        )
    )
    assert (rec.recipient, rec.action, rec.source) == ("bob@example.net", "failed", "domino")
    assert "not listed in Domino Directory" in rec.diagnostic


def test_amazon_ses_bounce_notification() -> None:
    body = (
        '{"notificationType":"Bounce","bounce":{"bounceType":"Permanent","bounceSubType":"General",'
        '"bouncedRecipients":[{"emailAddress":"bob@example.net","action":"failed","status":"5.1.1",'
        '"diagnosticCode":"smtp; 550 5.1.1 user unknown"}],"reportingMTA":"dsn; a8-1.smtp-out.amazonses.com"},'
        '"mail":{"source":"sender@example.com","destination":["bob@example.net"]}}'
    )
    (rec,) = parse_dsn(_notice(body, "AWS Notification Message"))
    assert (rec.recipient, rec.action, rec.status, rec.reply_code, rec.source) == ("bob@example.net", "failed", "5.1.1", 550, "amazonses")
