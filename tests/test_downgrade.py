"""8-bit bodies made 7-bit for a server without 8BITMIME (fastmta.message.downgrade).

What a user checks: what arrives has no 8-bit octet in its body, and every part
decodes to what it did before, read by Python's own MIME parser (not ours);
parts that were 7-bit keep their bytes.
"""

from __future__ import annotations

import email
import itertools
import random
from email.policy import compat32

from hypothesis import given, settings
from hypothesis import strategies as st

from fastmta.message import core
from fastmta.message.downgrade import body_is_8bit, seven_bit


def parts_of(message: bytes) -> list[tuple[str, bytes | None]]:
    """(content type, decoded payload; None for a container) of every part, in order."""
    out: list[tuple[str, bytes | None]] = []
    for part in email.message_from_bytes(message, policy=compat32).walk():
        payload = None if part.is_multipart() else part.get_payload(decode=True)
        if isinstance(payload, bytes) and part.get_content_maintype() == "text":
            payload = payload.replace(b"\r\n", b"\n")  # a decoder's choice of line end, not content
        out.append((part.get_content_type(), payload))
    return out


def assert_converted(original: bytes) -> bytes:
    out = seven_bit(original)
    assert not body_is_8bit(out)
    _, start = core.split_header_fields(out)
    assert out[start:].isascii()
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    assert parts_of(core.normalize_crlf(out)) == parts_of(core.normalize_crlf(original))
    return out


# --- generated MIME trees ------------------------------------------------------------------------

TEXT = st.text(alphabet=st.sampled_from(list("abc xyz.=\t-") + ["\u00e9", "\u00fc", "\u4e2d", "\U0001f600", "\n"]),
               max_size=300)
LABELS = st.sampled_from(["", "7bit", "8bit", "binary", "8BIT"])


@st.composite
def leaf(draw: st.DrawFn) -> bytes:
    label = draw(LABELS)
    cte = f"Content-Transfer-Encoding: {label}\r\n" if label else ""
    if draw(st.booleans()):
        ctype = draw(st.sampled_from(["text/plain", "text/html"]))
        body = draw(TEXT).replace("\n", "\r\n").encode()
        if draw(st.booleans()):
            body += b"." + b"x" * draw(st.integers(0, 900)) + b" \r\n"  # a long line, a dot, a trailing space
        return f"Content-Type: {ctype}; charset=utf-8\r\n{cte}\r\n".encode() + body
    data = draw(st.binary(max_size=300)).replace(b"\r", b"").replace(b"\n", b"\r\n")
    return f"Content-Type: application/octet-stream\r\n{cte}\r\n".encode() + data


_BOUNDARIES = itertools.count()


def multipart(children: list[bytes], rng_token: int) -> bytes:
    # Distinct at every level (RFC 2046 5.1.1: a nested multipart with its parent's boundary is not MIME).
    boundary = f"=_b{rng_token:08x}.{next(_BOUNDARIES)}"
    body = b"preamble \xc3\xa9\r\n" + b"".join(f"--{boundary}\r\n".encode() + c + b"\r\n" for c in children)
    return (f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'.encode() + body
            + f"--{boundary}--\r\nepilogue\r\n".encode())


def rfc822(inner: bytes) -> bytes:
    return b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\nSubject: inner\r\nMIME-Version: 1.0\r\n" + inner


ENTITY = st.recursive(
    leaf(),
    lambda children: st.one_of(
        st.builds(multipart, st.lists(children, min_size=1, max_size=4), st.integers(0, 2**32 - 1)),
        st.builds(rfc822, children),
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(ENTITY)
def test_any_mime_tree_comes_out_7bit_with_every_part_decoding_the_same(entity: bytes) -> None:
    message = b"From: a@b.test\r\nTo: c@d.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n" + entity
    assert_converted(message)


# --- the cases by name ---------------------------------------------------------------------------

SEVEN_BIT_PART = b"Content-Type: text/plain\r\n\r\nalready ascii\r\n"
MIXED = (b"From: a@b.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
         b"--B\r\n" + SEVEN_BIT_PART + b"\r\n--B\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9\r\n--B\r\nContent-Type: image/png\r\n\r\n\x89PNG\x00\xff\r\n--B--\r\n")


def test_only_the_8bit_parts_change() -> None:
    out = assert_converted(MIXED)
    assert SEVEN_BIT_PART in out  # byte for byte
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n--B" in out
    assert b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORwD/\r\n--B--" in out
    assert out.count(b"Content-Transfer-Encoding: 8bit") == 0


def test_a_7bit_message_is_returned_as_it_is() -> None:
    message = b"Subject: x\r\n\r\nhello\r\n"
    assert seven_bit(message) is message
    utf8_subject = "Subject: caf\u00e9\r\n\r\nhello\r\n".encode()
    assert seven_bit(utf8_subject) is utf8_subject  # header octets need SMTPUTF8, not a conversion


def test_a_message_outside_mime_gets_mime_version_and_its_charset() -> None:
    utf8 = "From: a@b.test\nSubject: s\n\nna\u00efve caf\u00e9\n".encode()
    out = assert_converted(utf8)
    assert b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n" in out
    assert email.message_from_bytes(out).get_payload(decode=True) == "na\u00efve caf\u00e9\r\n".encode()
    latin1 = b"Subject: s\r\n\r\ncaf\xe9\r\n"
    out = assert_converted(latin1)
    assert b"charset=unknown-8bit" in out and out.endswith(b"caf=E9\r\n")


def test_malformed_encodings_still_come_out_7bit_meaning_kept() -> None:
    qp = b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf\xc3\xa9 =3D\r\n"
    out = assert_converted(qp)
    assert out.endswith(b"caf=C3=A9 =3D\r\n")
    b64 = b"MIME-Version: 1.0\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\naGk\xff=\r\n"
    assert assert_converted(b64).endswith(b"aGk=\r\n")
    no_boundary = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=NOPE\r\n\r\ncaf\xc3\xa9\r\n"
    assert seven_bit(no_boundary) == no_boundary  # a multipart may not be encoded whole (RFC 2045 6.4)


def test_a_digest_part_without_headers_is_a_message() -> None:
    digest = (b"MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=D\r\n\r\n--D\r\n\r\n"
              b"Subject: one\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\xc3\xa9t\xc3\xa9\r\n--D--\r\n")
    out = assert_converted(digest)
    assert b"Subject: one\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable" in out


def test_hostile_nesting_is_bounded() -> None:
    depth = 5000
    head = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth))
    message = b"MIME-Version: 1.0\r\n" + head + b"\r\n\xc3\xa9\r\n"
    out = seven_bit(message)  # no RecursionError; below the bound, left as it is (nothing may encode it whole)
    assert out == message


def test_lines_stay_within_smtp_limits_and_dots_cannot_end_data() -> None:
    rng = random.Random(7)
    text = "".join(rng.choice(["\u00e9", "a", " ", "."]) for _ in range(5000))
    message = ("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text + "\r\n.\r\n").encode()
    out = assert_converted(message)
    assert max(len(line) for line in out.split(b"\r\n")) <= 78
    assert b"\r\n.\r\n" not in out


# --- found by an attack on the first version ----------------------------------------------------


def test_a_forwarded_message_with_8bit_headers_stays_a_message() -> None:
    # Its header octets cannot be encoded (RFC 2046 5.2.1 forbids base64 on message/rfc822, which it got).
    forwarded = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=F\r\n\r\n--F\r\n"
                 b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                 b"Subject: caf\xc3\xa9\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nna\xc3\xafve\r\n--F--\r\n")
    out = seven_bit(forwarded)
    assert b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\nSubject: caf\xc3\xa9\r\n" in out
    assert b"na=C3=AFve" in out and b"base64" not in out
    assert parts_of(out) == parts_of(forwarded)


def test_signed_and_encrypted_multiparts_are_never_touched() -> None:
    # RFC 1847: converting inside breaks the S/MIME or PGP signature (openssl smime -verify failed).
    for kind in (b"signed; protocol=\"application/pkcs7-signature\"", b"encrypted; protocol=\"application/pgp-encrypted\""):
        message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/" + kind + b"; boundary=S\r\n\r\n--S\r\n"
                   b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9\r\n"
                   b"--S\r\nContent-Type: application/octet-stream\r\n\r\nsig\r\n--S--\r\n")
        assert seven_bit(message) == message


def test_a_delivery_report_keeps_its_fields() -> None:
    # message/delivery-status is fields, not a message: no Content-Transfer-Encoding inserted, nothing encoded.
    report = (b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=R\r\n\r\n"
              b"--R\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.test\r\n\r\n"
              b"Final-Recipient: rfc822; a@b.test\r\nDiagnostic-Code: smtp; 550 M\xc3\xbcller unknown\r\n--R--\r\n")
    assert seven_bit(report) == report


def test_parts_without_a_header_section_and_cr_line_ends_are_converted() -> None:
    no_head = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nhello caf\xc3\xa9\r\n--B--\r\n"
    out = assert_converted(no_head)
    assert b"hello caf=C3=A9" in out
    cr_only = b"MIME-Version: 1.0\rContent-Type: text/plain; charset=utf-8\r\rcaf\xc3\xa9\r"
    assert body_is_8bit(cr_only)
    assert assert_converted(cr_only).endswith(b"\r\n\r\ncaf=C3=A9\r\n")


def test_two_delimiters_in_a_row_make_no_new_part() -> None:
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n--B\r\n"
               b"Content-Type: text/plain; charset=utf-8\r\n\r\ncaf\xc3\xa9\r\n--B--\r\n")
    assert_converted(message)


def test_a_quoted_printable_part_with_raw_octets_is_encoded_again_within_line_limits() -> None:
    text = b"\xc3\xa9" * 400 + b" =3D end\r\n"
    message = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" + text
    out = assert_converted(message)
    assert max(len(line) for line in out.split(b"\r\n")) <= 76
    binary = b"MIME-Version: 1.0\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n%PDF\xe2\xe3=0D=0A\r\n"
    out = assert_converted(binary)
    assert b"Content-Transfer-Encoding: base64" in out and b"quoted-printable" not in out


def test_a_soft_line_break_never_starts_a_line_with_the_boundary() -> None:
    # Found by a review: 75 letters then "--XYZ" in a part of a multipart bounded by XYZ; quoted-printable
    # cut the line before "--XYZ", which then ended the part (and the text lost it).
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XYZ\r\n\r\n--XYZ\r\n"
               b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + b"a" * 75 + b"--XYZ caf\xc3\xa9\r\n--XYZ--\r\n")
    out = assert_converted(message)
    assert b"\r\n=2D-XYZ" in out


def test_headers_are_read_as_pythons_parser_reads_them() -> None:
    # Found by a second attack: a digest part without a header section lost its message wrapper (the
    # inner message's new fields became the part's); a part whose first line is ":" is a header field
    # to Python (it was read as body); "Content-Type : x" is not one; the last part of a multipart
    # without its close delimiter gained a line end; a field folded over many lines is read in linear time.
    digest = (b"MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=D\r\n\r\n--D\r\nhello caf\xc3\xa9\r\n"
              b"--D--\r\n")
    assert_converted(digest)
    colon = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n:\r\n"
             b"Content-Type: image/png\r\n\r\n\x89PNG\r\n--B--\r\n")
    assert b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n" in assert_converted(colon)
    spaced = b"MIME-Version: 1.0\r\nContent-Type : application/octet-stream\r\n\r\n\xff\xfe\r\n"
    assert assert_converted(spaced).count(b"Content-Transfer-Encoding") == 1
    unclosed = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
                b"Content-Type: application/octet-stream\r\n\r\n\x00\xff\xfe\r\n")
    assert_converted(unclosed)
    folded = b"MIME-Version: 1.0\r\nX-Long: a\r\n" + b" b\r\n" * 50_000 + b"Content-Type: text/plain\r\n\r\ncaf\xc3\xa9\r\n"
    assert seven_bit(folded).endswith(b"\r\n\r\ncaf=C3=A9\r\n")
