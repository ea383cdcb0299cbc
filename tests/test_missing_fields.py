"""A message without Date or Message-ID gets them at intake (pickup files, serve's SMTP and HTTP), as
Postfix's cleanup adds them: Gmail refuses mail without a Message-ID, and `fastmta check` calls a
missing Date an error. Found in an operator's first hour: such mail was relayed as it came."""

from __future__ import annotations

import email
import email.utils
import re

import pytest

from fastmta.errors import InputError
from fastmta.message.headers import checked_content, header_section_error, with_missing_fields


def test_missing_fields_are_added_at_the_end_of_the_header_section_and_present_ones_kept() -> None:
    bare = b"Received: from app by mta\r\nFrom: a@s.example\r\nSubject: alert\r\n\r\ndisk full\r\n"
    got = with_missing_fields(bare, "s.example")
    # Where Postfix's cleanup puts them: the trace (Received) stays on top (RFC 5321 4.4).
    head, body = got.split(b"\r\n\r\n", 1)
    assert head.startswith(b"Received: from app by mta\r\nFrom: a@s.example\r\nSubject: alert\r\nDate: ")
    assert body == b"disk full\r\n"
    msg = email.message_from_bytes(got)
    assert email.utils.parsedate_to_datetime(msg["Date"]) is not None
    assert re.fullmatch(r"<[0-9a-f]+\.[0-9a-f]{12}@s\.example>", msg["Message-ID"])
    assert with_missing_fields(bare, "s.example") != got  # each its own id
    # Only what is missing, in any case of the name; the line ends of the message.
    has_date = b"DATE: Mon, 7 Dec 2026 10:00:00 +0000\nSubject: x\n\nbody\n"
    got = with_missing_fields(has_date, "s.example")
    assert got.startswith(b"DATE: Mon, 7 Dec 2026 10:00:00 +0000\nSubject: x\nMessage-ID: <") and got.endswith(b">\n\nbody\n")
    whole = b"Date: x\r\nmessage-id: <a@b>\r\n\r\nbody\r\n"
    assert with_missing_fields(whole, "s.example") is whole
    # A header section without a body, a body without a header section.
    assert re.fullmatch(rb"Subject: s\r\nDate: [^\r]+\r\nMessage-ID: <[^>]+>\r\n",
                        with_missing_fields(b"Subject: s", "s.example"))
    assert re.fullmatch(rb"Date: [^\r]+\r\nMessage-ID: <[^>]+>\r\n\r\nonly a body\r\n",
                        with_missing_fields(b"\r\nonly a body\r\n", "s.example"))
    # A field in the body does not count; a signed message is left as its signer made it.
    body_only = b"Subject: s\r\n\r\nDate: in the body\r\nMessage-ID: <in@body>\r\n"
    assert with_missing_fields(body_only, "s.example").count(b"Message-ID:") == 2
    signed = b"DKIM-Signature: v=1; a=ed25519-sha256; h=from:subject\r\nSubject: s\r\n\r\nx\r\n"
    assert with_missing_fields(signed, "s.example") is signed
    # The id's domain is a host name or nothing: an address literal or worse gives localhost.
    assert b"@localhost>" in with_missing_fields(bare, "[192.0.2.1]")
    assert b"@localhost>" in with_missing_fields(bare, "x>\r\nBcc: e@vil")


def test_what_mail_programs_leave_before_the_header_section_goes() -> None:
    # An mbox "From " line, a byte order mark: refused as no header field (a 554 for mail its sender
    # meant well), found by a review. Postfix's cleanup drops the first too.
    for start in (b"From sender@x.example Mon Dec  7 10:00:00 2026\r\n", b"\xef\xbb\xbf",
                  b"\xef\xbb\xbfFrom sender@x.example Mon Dec  7 10:00:00 2026\n"):
        assert checked_content(start + b"Subject: s\r\n\r\nx\r\n") == b"Subject: s\r\n\r\nx\r\n"
    kept = b"From : obsolete spacing <a@b.example>\r\nSubject: s\r\n\r\nx\r\n"  # a From field, not mbox
    assert checked_content(kept) is kept
    with pytest.raises(InputError, match="a NUL byte at offset 12"):
        checked_content(b"Subject: s\r\n\x00")


@pytest.mark.parametrize("message", [b"no headers at all", b"From sender@x Mon Dec 7\r\nSubject: s\r\n\r\nb\r\n",
                                     b"<html>\r\n\r\n", b": no name\r\n\r\nx\r\n"])
def test_a_message_without_a_header_section_is_refused(message: bytes) -> None:
    # Taken over HTTP (pickup refused it): Date and Message-ID put on top would have made its first
    # line of text a header, and no receiver reads it as its sender meant.
    assert header_section_error(message) == (
        "not an RFC 5322 message: the first line is no header field (a message starts with its header section)")


def test_a_message_that_starts_with_its_blank_line_has_no_header_but_is_well_formed() -> None:
    assert header_section_error(b"\r\nonly a body\r\n") is None
