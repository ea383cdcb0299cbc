"""Logging in at a relay (SMTP AUTH, RFC 4954), as Postfix's smtp_sasl_* and KumoMTA's smtp_auth_* do.

A smarthost that wants a login (a provider's submission relay, a corporate gateway): the engine
sends AUTH PLAIN (or LOGIN when only that is offered) after STARTTLS, never in clear unless told,
and a refused login defers the mail (the sender's configuration, not the recipients'). The relay is
aiosmtpd with its own authenticator, on loopback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from fastmta.delivery.config import config_from_dict
from fastmta.delivery.engine import Engine, Status
from fastmta.errors import ConfigError
from fastmta.smtp.protocol import Credentials
from tlsutil import make_cert, server_context

Run = Callable[[Coroutine[Any, Any, Any]], Any]
BODY = b"From: app@sender.test\r\nTo: r@x.test\r\nSubject: relayed\r\n\r\nhello\r\n"
PASSWORD = "s3cret p\u00e4ss"  # a space and a non-ASCII letter: both must arrive as written


class Relay:
    """aiosmtpd handler and authenticator: takes mail only from a logged-in session."""

    def __init__(self) -> None:
        self.logins: list[tuple[str, str, str]] = []  # (mechanism, user, password) tried
        self.got: list[list[str]] = []

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                     auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        self.logins.append((mechanism, user, password))
        return AuthResult(success=(user, password) == ("app", PASSWORD), handled=False)  # not handled: 535

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not session.authenticated:
            return "530 5.7.0 Authentication required"
        self.got.append(list(envelope.rcpt_tos))
        return "250 2.0.0 OK"


def deliver(run: Run, tmp_path: Path, *, tls: bool, auth: dict[str, Any], key: str = "127.0.0.1",
            password: str = PASSWORD, **smtp_kw: Any) -> tuple[Relay, Any]:
    relay = Relay()
    (tmp_path / "relay.pass").write_text(password + "\n", encoding="utf-8")
    kw: dict[str, Any] = {"authenticator": relay.authenticate, "auth_require_tls": tls, **smtp_kw}
    if tls:
        cert, keyfile = make_cert(tmp_path)
        kw["tls_context"] = server_context(cert, keyfile)

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(relay, **kw), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = config_from_dict({
            "routing": {"static": {"*": [f"127.0.0.1:{port}"]},
                        "auth": {key.replace("PORT", str(port)): {"password_file": "relay.pass", **auth}}},
            "smtp": {"tls": "opportunistic"}, "queue": {"max_lifetime": 3, "retry_initial": 1},
        }, base_dir=tmp_path)
        async with server, Engine(cfg) as engine:
            mid = await engine.submit(BODY, "app@sender.test", ["r@x.test"])
            [outcome] = await asyncio.wait_for(engine.result(mid), 20)
        return outcome

    return relay, run(main())


def test_plain_after_starttls(run: Run, tmp_path: Path) -> None:
    relay, outcome = deliver(run, tmp_path, tls=True, auth={"username": "app"})
    assert outcome.status is Status.DELIVERED and relay.got == [["r@x.test"]]
    assert relay.logins == [("PLAIN", "app", PASSWORD)]


def test_login_when_plain_is_not_offered_and_a_host_port_key(run: Run, tmp_path: Path) -> None:
    relay, outcome = deliver(run, tmp_path, tls=True, auth={"username": "app"}, key="127.0.0.1:PORT",
                             auth_exclude_mechanism=["PLAIN"])
    assert outcome.status is Status.DELIVERED and relay.logins == [("LOGIN", "app", PASSWORD)]


def test_a_refused_login_defers_never_bounces(run: Run, tmp_path: Path) -> None:
    # Whatever the relay answers (535 here), a refused login is the sender's configuration: the mail
    # waits for it to be fixed (Postfix's smtp_sasl_auth_soft_bounce), it is never bounced.
    relay, outcome = deliver(run, tmp_path, tls=True, auth={"username": "app"}, password="wrong")
    assert outcome.status is Status.EXPIRED and relay.got == []
    assert relay.logins and all(login[2] == "wrong" for login in relay.logins)
    assert outcome.reply.code == 454 and "refused our login" in outcome.reply.text and "535" in outcome.reply.text


def test_credentials_never_go_in_clear_unless_allowed(run: Run, tmp_path: Path) -> None:
    relay, outcome = deliver(run, tmp_path, tls=False, auth={"username": "app"})
    assert outcome.status is Status.EXPIRED and relay.logins == []  # not even tried
    assert "not sent in clear" in outcome.reply.text
    allowed, delivered = deliver(run, tmp_path, tls=False, auth={"username": "app", "allow_plaintext": True})
    assert delivered.status is Status.DELIVERED and allowed.logins == [("PLAIN", "app", PASSWORD)]


def test_a_missing_or_empty_password_file_is_named_at_start(tmp_path: Path) -> None:
    route = {"static": {"*": ["relay.test:587"]}}
    with pytest.raises(ConfigError, match=r"routing\.auth\.relay\.test\.password_file: .*nope\.pass"):
        config_from_dict({"routing": {**route, "auth": {"relay.test": {"username": "u", "password_file": "nope.pass"}}}},
                         base_dir=tmp_path)
    (tmp_path / "empty.pass").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        config_from_dict({"routing": {**route, "auth": {"relay.test": {"username": "u", "password_file": "empty.pass"}}}},
                         base_dir=tmp_path)
    assert "hunter2" not in repr(Credentials("u", "hunter2"))  # never in a log line or a traceback
