"""The sink's pure parts: spec parsers, address syntax, unstuffing, reply templates."""

from __future__ import annotations

import pytest

from fastmta.sink.capture import envelope_headers, unstuff
from fastmta.sink.config import (
    ListenerConfig,
    RateLimit,
    parse_delay,
    parse_fault,
    parse_listen,
    parse_rate,
)
from fastmta.sink.profiles import PROFILES, ReplyTemplate
from fastmta.sink.syntax import PathError, split_path
from fastmta.smtp.address import is_valid_mailbox
from fastmta.smtp.reply import ReplyParser
from test_sink_support import stuff


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.2:2525") == ListenerConfig("127.0.0.2", 2525, "default")
    assert parse_listen("127.0.0.1:0=gmail") == ListenerConfig("127.0.0.1", 0, "gmail")
    assert parse_listen("[::1]:25=Outlook") == ListenerConfig("::1", 25, "outlook")
    assert parse_listen(":0") == ListenerConfig("127.0.0.1", 0)
    for bad in ("127.0.0.1", "127.0.0.1:x", "mail.example.com:25", "[::1]25", "127.0.0.1:70000", "1.2.3.4:1=nope"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_parse_fault_delay_rate() -> None:
    f = parse_fault("eod:0.05:554 5.7.1 looks like spam")
    assert (f.phase, f.probability, f.code, f.text) == ("eod", 0.05, 554, "5.7.1 looks like spam")
    assert parse_fault("rcpt:1:450").text is None
    for bad in ("rcpt:0.1", "rcpt:x:450", "rcpt:0.1:250", "rcpt:0.1:45", "helo:0.1:450", "rcpt:-1:450"):
        with pytest.raises(ValueError):
            parse_fault(bad)
    assert parse_delay("connect:2.5") == ("connect", 2.5)
    with pytest.raises(ValueError):
        parse_delay("connect:-1")
    assert parse_rate("20/s") == RateLimit(20.0, 20.0)
    assert parse_rate("120/m:5") == RateLimit(2.0, 5.0)
    assert parse_rate("1/h") == RateLimit(1 / 3600, 1.0)
    for bad in ("20", "20/d", "x/s", "0/s"):
        with pytest.raises(ValueError):
            parse_rate(bad)


@pytest.mark.parametrize(
    ("arg", "addr", "params"),
    [
        (b"<a@example.com>", b"a@example.com", []),
        (b" <a@example.com>", b"a@example.com", []),
        (b"<>", b"", []),
        (b"<a@example.com> SIZE=100 BODY=8BITMIME", b"a@example.com", [b"SIZE=100", b"BODY=8BITMIME"]),
        (b'<"john doe>"@example.com> SMTPUTF8', b'"john doe>"@example.com', [b"SMTPUTF8"]),
        (b"<@relay.example,@b.example:user@c.example>", b"user@c.example", []),
    ],
)
def test_split_path(arg: bytes, addr: bytes, params: list[bytes]) -> None:
    assert split_path(arg) == (addr, params)


@pytest.mark.parametrize("arg", [b"a@example.com", b"<a@example.com", b"<a@example.com>x", b"<" + b"a" * 300 + b">"])
def test_split_path_refuses(arg: bytes) -> None:
    with pytest.raises(PathError):
        split_path(arg)


def test_mailbox_syntax() -> None:
    good = [b"a@example.com", b"a.b+c@sub.example.co", b'"a b"@example.com', b"x@[192.0.2.1]", b"o'neil@example.org"]
    bad = [b"a@", b"@example.com", b"a@@example.com", b"a b@example.com", b"a..b@example.com", b"a@-x.com", b"a@x_y"]
    for addr in good:
        assert is_valid_mailbox(addr, utf8=False), addr
    for addr in bad:
        assert not is_valid_mailbox(addr, utf8=False), addr
    utf8 = "jörg@bücher.example".encode()
    assert not is_valid_mailbox(utf8, utf8=False)
    assert is_valid_mailbox(utf8, utf8=True)
    assert not is_valid_mailbox(b"j\xffrg@example.com", utf8=True)  # not UTF-8


@pytest.mark.parametrize(
    "content",
    [b"", b"x\r\n", b".\r\n", b"..\r\n", b".a\r\n.b\r\n", b"a\r\n...\r\n.\r\nb\r\n", b"\xff.\r\n.\xff\r\n"],
)
def test_unstuff_inverts_stuffing(content: bytes) -> None:
    wire = stuff(content)
    assert wire.endswith(b".\r\n")
    body = wire[: -3]
    assert unstuff(body) == content


def test_envelope_headers() -> None:
    assert envelope_headers(b"", [b"a@x", b"b@y"]) == b"X-Sender: <>\r\nX-Receiver: a@x\r\nX-Receiver: b@y\r\n"


def test_reply_templates_render_valid_replies_for_every_profile() -> None:
    fields = {"host": "h.example", "ip": "192.0.2.7", "sender": "s@x", "rcpt": "r@y", "id": "ABC123"}
    for profile in PROFILES.values():
        for name in ("greeting", "mail_ok", "rcpt_ok", "data_go", "queued", "quit", "rate_limited",
                     "too_many_connections", "greylisted", "unknown_user"):  # fmt: skip
            template: ReplyTemplate = getattr(profile, name)
            wire = template.render(fields)
            [reply] = ReplyParser().feed(wire)
            assert reply.code == template.code, (profile.name, name)
            assert "{" not in wire.decode(), (profile.name, name, wire)
        for code in (421, 450, 451, 452, 550, 552, 554, 499):
            [reply] = ReplyParser().feed(profile.text_for(code).render(fields))
            assert reply.code == code
    assert PROFILES["gmail"].rate_limited.render(fields).count(b"\r\n") == 5  # multi-line
    assert PROFILES["appliance"].unknown_user.render(fields) == b"550 5.1.1 user unknown\r\n"


def test_reply_template_refuses_line_breaks() -> None:
    with pytest.raises(ValueError):
        ReplyTemplate(250, ("ok\r\n250 injected",))
    with pytest.raises(ValueError):
        ReplyTemplate(700, ("x",))


def test_reply_template_with_stray_braces_is_sent_as_written() -> None:
    assert ReplyTemplate(550, ("5.7.1 bad {", "{0} {ip.x} {ip}")).render({"ip": "192.0.2.1"}) == (
        b"550-5.7.1 bad {\r\n550 {0} {ip.x} {ip}\r\n"
    )
    assert ReplyTemplate(550, ("5.7.1 from {ip} {unknown}",)).render({"ip": "192.0.2.1"}) == (
        b"550 5.7.1 from 192.0.2.1 {unknown}\r\n"
    )
