"""[serve] meta_headers: tags read from the headers of SMTP and pickup mail (fastmta.serve.meta_headers)."""

from __future__ import annotations

import pytest

from fastmta.errors import InputError
from fastmta.serve.config import ServeConfig
from fastmta.serve.meta_headers import MetaHeaders

TAGS = MetaHeaders({"X-Job": "job", "X-Virtual-MTA": "pool"})


def test_the_first_header_is_read_unfolded_and_every_one_taken_out() -> None:
    content = (b"From: a@sender.example\r\nX-Job: spring\r\n sale\r\nx-virtual-mta: marketing\r\nX-Job: second\r\n"
               b"Subject: s\r\n\r\nbody\r\nX-Job: in the body\r\n")
    out, meta = TAGS.take(content)
    assert meta == {"job": "spring sale", "pool": "marketing"}
    assert out == b"From: a@sender.example\r\nSubject: s\r\n\r\nbody\r\nX-Job: in the body\r\n"


def test_a_pickup_file_with_bare_newlines_and_mail_without_tags() -> None:
    assert TAGS.take(b"From: a@b.example\nX-Job: lf\n\nbody\n") == (b"From: a@b.example\n\nbody\n", {"job": "lf"})
    plain = b"From: a@b.example\r\nSubject: X-Job: no\r\n\r\nX-Job: body\r\n"
    assert TAGS.take(plain) == (plain, {})
    assert MetaHeaders({}).take(plain) == (plain, {})


def test_a_header_the_client_signed_stays() -> None:
    content = (b"DKIM-Signature: v=1; a=rsa-sha256; d=b.example; s=x;\r\n\th=From : Subject : X-Job; bh=a; b=b\r\n"
               b"From: a@b.example\r\nX-Job: autumn\r\nX-Virtual-MTA: m\r\n\r\nbody\r\n")
    out, meta = TAGS.take(content)
    assert meta == {"job": "autumn", "pool": "m"}
    assert b"X-Job: autumn\r\n" in out and b"X-Virtual-MTA" not in out
    kept = MetaHeaders({"X-Job": "job"}, strip=False)
    assert kept.take(content) == (content, {"job": "autumn"})


@pytest.mark.parametrize("value", [b"", b"x" * 257, b"a\x01b", b"\xff\xfe"])
def test_a_value_that_is_not_a_tag_refuses_the_message_naming_the_header(value: bytes) -> None:
    with pytest.raises(InputError, match="header X-Virtual-MTA: not a tag"):
        TAGS.take(b"X-Virtual-MTA: " + value + b"\r\n\r\nbody\r\n")


@pytest.mark.parametrize(("mapping", "words"), [
    ({"X-Job": "via"}, "not one the service sets"),  # how it came in is the service's to say
    ({"X-Auth": "auth"}, "not one the service sets"),
    ({"X Job": "job"}, "not a header name"),
    ({"X-Job": "two words"}, "meta key"),
])
def test_the_configuration_refuses_keys_a_client_must_not_set(mapping: dict[str, str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ServeConfig(meta_headers=mapping)


def test_the_body_is_never_read_and_a_bare_cr_is_not_a_line_end() -> None:
    body = b"X-Job: in the body\r\n" * 100_000
    out, meta = TAGS.take(b"X-Job: real\r\nSubject: s\r\n\r\n" + body)
    assert meta == {"job": "real"} and out == b"Subject: s\r\n\r\n" + body
    with pytest.raises(InputError, match="header X-Job"):  # "X-Job: a<CR>b": one line, with a control character
        TAGS.take(b"X-Job: a\rb\r\nFrom: x@y.example\r\n\r\nbody\r\n")
    assert TAGS.take(b"From: x@y.example\r\nX-Job: last") == (b"From: x@y.example\r\n", {"job": "last"})
