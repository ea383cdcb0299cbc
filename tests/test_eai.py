"""Internationalised mail (RFC 6531/6532) through the engine, against aiosmtpd with and without SMTPUTF8."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from fastmta import Engine, Status, config_from_dict
from fastmta.delivery.eai import ascii_address

pytestmark = pytest.mark.interop
Run = Callable[[Coroutine[Any, Any, Any]], Any]


class Keep:
    """aiosmtpd handler: keep each envelope and the MAIL options."""

    def __init__(self) -> None:
        self.envelopes: list[tuple[str, list[str], list[str]]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos), list(envelope.mail_options)))
        return "250 2.0.0 ok"


async def deliver(smtputf8: bool, message: bytes, recipients: list[str]) -> tuple[dict[str, Any], Keep]:
    handler = Keep()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, loop=loop, enable_SMTPUTF8=smtputf8), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = config_from_dict({
        "routing": {"static": {"*": [f"127.0.0.1:{port}"]}},
        "smtp": {"tls": "never"},
        "sites": {"*": {"adaptive": {"enabled": False}}},
        "queue": {"retry_initial": 0.2, "retry_max": 0.5, "max_lifetime": 2},
    })
    try:
        async with Engine(config) as engine:
            msg_id = await engine.submit(message, "sender@example.net", recipients)
            outcomes = await asyncio.wait_for(engine.result(msg_id), 30)
    finally:
        server.close()
        await server.wait_closed()
    return {o.recipient: o for o in outcomes}, handler


PLAIN = b"From: sender@example.net\r\nSubject: hi\r\n\r\nhello\r\n"
RCPTS = ["jörg@example.org", "ascii-ok@example.org", "kunde@bücher.test"]


def test_without_smtputf8_only_the_utf8_mailbox_fails(run: Run) -> None:
    by, handler = run(deliver(False, PLAIN, RCPTS))
    assert by["jörg@example.org"].status is Status.BOUNCED
    assert (by["jörg@example.org"].reply.code, by["jörg@example.org"].reply.enhanced) == (553, "5.6.7")
    assert by["ascii-ok@example.org"].status is Status.DELIVERED
    assert by["kunde@bücher.test"].status is Status.DELIVERED
    [(sender, rcpts, options)] = handler.envelopes
    assert sender == "sender@example.net"
    # The U-label domain went out as A-labels: the same mailbox, no SMTPUTF8 needed.
    assert rcpts == ["ascii-ok@example.org", "kunde@xn--bcher-kva.test"]
    assert "SMTPUTF8" not in options


def test_with_smtputf8_every_address_goes_as_it_is(run: Run) -> None:
    by, handler = run(deliver(True, PLAIN, RCPTS))
    assert {o.status for o in by.values()} == {Status.DELIVERED}
    [(sender, rcpts, options)] = handler.envelopes
    assert sender == "sender@example.net"
    assert rcpts == RCPTS and "SMTPUTF8" in options


UTF8_HEADERS = "From: sender@example.net\r\nTo: <renée@example.org>\r\nSubject: hi\r\n\r\nhello\r\n".encode()


def test_utf8_headers_ask_for_smtputf8_even_with_ascii_addresses(run: Run) -> None:
    by, handler = run(deliver(True, UTF8_HEADERS, ["ascii-ok@example.org"]))
    assert by["ascii-ok@example.org"].status is Status.DELIVERED
    assert "SMTPUTF8" in handler.envelopes[0][2]


def test_utf8_headers_to_a_server_without_smtputf8_bounce_5_6_7(run: Run) -> None:
    by, handler = run(deliver(False, UTF8_HEADERS, ["ascii-ok@example.org"]))
    o = by["ascii-ok@example.org"]
    assert o.status is Status.BOUNCED and o.reply.enhanced == "5.6.7" and "UTF-8 headers" in o.reply.text
    assert handler.envelopes == []


def test_ascii_address() -> None:
    assert ascii_address("a@b.example") == "a@b.example"
    assert ascii_address("kunde@bücher.test") == "kunde@xn--bcher-kva.test"
    assert ascii_address("jörg@example.org") is None
