"""Logging in at a relay (SMTP AUTH, RFC 4954), as Postfix's smtp_sasl_* and KumoMTA's smtp_auth_* do.

A smarthost that wants a login (a provider's submission relay, a corporate gateway): the engine
sends AUTH PLAIN (or LOGIN when only that is offered) after STARTTLS, never in clear unless told,
and a refused login defers the mail (the sender's configuration, not the recipients'). The relay is
aiosmtpd with its own authenticator, on loopback.
"""

from __future__ import annotations

import asyncio
import base64
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
            password: str = PASSWORD, server_class: type[SMTP] = SMTP, trust: bool = True,
            **smtp_kw: Any) -> tuple[Relay, Any]:
    """One message through the relay. Its certificate (for 127.0.0.1, as the route names it) is
    trusted through [smtp] tls_ca_file unless *trust* is False."""
    relay = Relay()
    (tmp_path / "relay.pass").write_text(password + "\n", encoding="utf-8")
    kw: dict[str, Any] = {"authenticator": relay.authenticate, "auth_require_tls": tls, **smtp_kw}
    smtp: dict[str, Any] = {"tls": "opportunistic"}
    if tls:
        cert, keyfile = make_cert(tmp_path)
        kw["tls_context"] = server_context(cert, keyfile)
        if trust:
            smtp["tls_ca_file"] = str(cert)

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: server_class(relay, **kw), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = config_from_dict({
            "routing": {"static": {"*": [f"127.0.0.1:{port}"]},
                        "auth": {key.replace("PORT", str(port)): {"password_file": "relay.pass", **auth}}},
            "smtp": smtp, "queue": {"max_lifetime": 3, "retry_initial": 1},
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


class RefusesStartTLS(SMTP):
    async def smtp_STARTTLS(self, arg: str) -> None:
        await self.push("454 4.7.0 TLS not available due to temporary reason")


class FirstHandshakeBreaks(SMTP):
    """Breaks its first TLS handshake (as an attacker on the path can), then behaves."""

    broken = 0
    clear_logins = 0

    async def smtp_STARTTLS(self, arg: str) -> None:
        if FirstHandshakeBreaks.broken == 0:
            FirstHandshakeBreaks.broken += 1
            await self.push("220 2.0.0 Ready to start TLS")
            self.transport.write(b"\x15\x03\x03\x00\x02\x02\x28")  # a TLS alert: handshake_failure
            self.transport.close()
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        if self._tls_protocol is None:
            FirstHandshakeBreaks.clear_logins += 1
        await super().smtp_AUTH(arg)


def test_a_refused_starttls_still_means_no_login_in_clear(run: Run, tmp_path: Path) -> None:
    # Found by an attack: a STARTTLS answered 454 went on in clear straight to MAIL, skipping the
    # login: the relay's "530 Authentication required" bounced the mail. Now as if STARTTLS was not
    # offered: deferred, or a login in clear when allowed.
    relay, outcome = deliver(run, tmp_path, tls=True, auth={"username": "app"}, server_class=RefusesStartTLS)
    assert outcome.status is Status.EXPIRED and relay.logins == [] and "not sent in clear" in outcome.reply.text
    allowed, delivered = deliver(run, tmp_path, tls=True, auth={"username": "app", "allow_plaintext": True},
                                 server_class=RefusesStartTLS, auth_require_tls=False)
    assert delivered.status is Status.DELIVERED and allowed.logins == [("PLAIN", "app", PASSWORD)]


def test_one_broken_handshake_never_puts_the_login_in_clear(run: Run, tmp_path: Path) -> None:
    # Found by an attack: one failed handshake made the host "TLS broken" for an hour and the next
    # connection went in clear: with allow_plaintext the password went with it (an attacker on the
    # path breaks one handshake and reads it), without it the relay got nothing for an hour.
    FirstHandshakeBreaks.broken = FirstHandshakeBreaks.clear_logins = 0
    relay, outcome = deliver(run, tmp_path, tls=True, auth={"username": "app", "allow_plaintext": True},
                             server_class=FirstHandshakeBreaks, auth_require_tls=False)
    assert FirstHandshakeBreaks.broken == 1 and FirstHandshakeBreaks.clear_logins == 0
    assert outcome.status is Status.DELIVERED and relay.logins == [("PLAIN", "app", PASSWORD)]


def test_keys_are_read_as_route_hosts_and_must_name_one(tmp_path: Path) -> None:
    (tmp_path / "p").write_text("\ufeffpw\r\n", encoding="utf-8")  # an editor's BOM and CRLF: not the password
    routes = {"static": {"a.test": ["[::1]:587"], "b.test": ["Relay.Example.:2525"], "c.test": ["10.0.0.1"]}}
    auth = {k: {"username": "u", "password_file": "p"} for k in ("[::1]:587", "relay.example.:2525", "10.0.0.1")}
    creds = config_from_dict({"routing": {**routes, "auth": auth}}, base_dir=tmp_path).routing.credentials()
    assert sorted(creds) == [("10.0.0.1", None), ("::1", 587), ("relay.example", 2525)]
    assert {c.password for c in creds.values()} == {"pw"}
    with pytest.raises(ConfigError, match=r"routing\.auth\.relay\.example:25: names no host of \[routing\.static\]"):
        config_from_dict({"routing": {**routes, "auth": {"relay.example:25": auth["10.0.0.1"]}}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="NUL"):
        config_from_dict({"routing": {**routes, "auth": {"10.0.0.1": {"username": "u\0x", "password_file": "p"}}}},
                         base_dir=tmp_path)


def test_sasl_dialogues_off_the_common_path(run: Run) -> None:
    # "AUTH=PLAIN LOGIN" (the pre-RFC 2554 form), PLAIN refused as unknown (504) then LOGIN, a
    # challenge it cannot answer cancelled with "*" (RFC 4954 4), and a "334 " to PLAIN's initial
    # response answered with it again.
    from fastmta.smtp.connection import SessionRefused, SMTPConnection, Timeouts
    from fastmta.smtp.protocol import Credentials
    from scripted import ScriptedSMTP

    seen: list[bytes] = []

    def relay(plain: bytes, login: list[bytes]) -> type[ScriptedSMTP]:
        class Relay(ScriptedSMTP):
            ehlo = b"250-relay\r\n250-PIPELINING\r\n250 AUTH=PLAIN LOGIN\r\n"

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                self.answers = [plain, *login]

            def data_received(self, data: bytes) -> None:
                for line in data.split(b"\r\n")[:-1]:
                    seen.append(line)
                    if line.startswith(b"AUTH") or (self.answers and self.answers[0][:3] in (b"334", b"235", b"501")
                                                    and line[:4] not in (b"EHLO", b"MAIL", b"QUIT")):
                        self.t.write(self.answers.pop(0) if self.answers else b"535 5.7.8 no\r\n")
                    else:
                        super().data_received(line + b"\r\n")
        return Relay

    async def login(server_class: type[ScriptedSMTP]) -> str:
        seen.clear()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(server_class, "127.0.0.1", 0)
        async with server:
            try:
                conn = await SMTPConnection.open("127.0.0.1", server.sockets[0].getsockname()[1],
                                                 timeouts=Timeouts.uniform(5),
                                                 credentials=Credentials("app", "pw", allow_plaintext=True))
            except SessionRefused as exc:
                return f"refused: {exc.reply}"
            await conn.quit()
            return "logged in"

    plain = b"AUTH PLAIN " + base64.b64encode(b"\0app\0pw")
    u, p = base64.b64encode(b"app"), base64.b64encode(b"pw")
    assert run(login(relay(b"235 2.7.0 ok\r\n", []))) == "logged in" and seen[1] == plain  # AUTH= form read
    assert run(login(relay(b"504 5.5.4 no\r\n", [b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n",
                                                    b"235 2.7.0 ok\r\n"]))) == "logged in"
    assert seen[1:5] == [plain, b"AUTH LOGIN", u, p]
    refused = run(login(relay(b"504 5.5.4 no\r\n", [b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n",
                                                      b"334 T1RQOg==\r\n", b"501 5.7.0 cancelled\r\n"])))
    assert seen[5] == b"*" and "454 4.7.0" in refused and "334 T1RQOg==" in refused
    assert run(login(relay(b"334 \r\n", [b"235 2.7.0 ok\r\n"]))) == "logged in"
    assert seen[1:3] == [plain, base64.b64encode(b"\0app\0pw")]


def test_the_login_waits_for_a_certificate_it_can_verify(run: Run, tmp_path: Path) -> None:
    # Found by reading the change again: opportunistic TLS does not verify, so anyone on the path could
    # answer STARTTLS with any certificate and read the password. A relay's sessions now verify its
    # certificate (tls_verify = false for one nothing can verify, on a network of one's own).
    relay, outcome = deliver(run, tmp_path, tls=True, auth={"username": "app"}, trust=False)
    assert outcome.status is Status.EXPIRED and relay.logins == [] and outcome.reply.enhanced == "4.7.5"
    unverified, delivered = deliver(run, tmp_path, tls=True, auth={"username": "app", "tls_verify": False},
                                    trust=False)
    assert delivered.status is Status.DELIVERED and unverified.logins == [("PLAIN", "app", PASSWORD)]


def test_relay_and_sink_keep_only_the_logins_of_their_target(tmp_path: Path) -> None:
    # Found by reading the change again: `fastmta send --relay/--sink` replaced the static routes and
    # kept every [routing.auth] entry, which then named no route: a traceback at start.
    import argparse

    from fastmta.cli.send import _effective_config

    (tmp_path / "p").write_text("pw\n")
    (tmp_path / "c.toml").write_text(  # each login names a host of the file's own routes
        '[routing.static]\n"*" = ["smarthost.test:587"]\n"b.test" = ["relay.test:25"]\n'
        '[routing.auth."smarthost.test:587"]\nusername = "u"\npassword_file = "p"\n'
        '[routing.auth."relay.test"]\nusername = "v"\npassword_file = "p"\n')
    args = argparse.Namespace(config=str(tmp_path / "c.toml"), relay=("relay.test", 2525), max_lifetime=None)
    config = _effective_config(args, None)
    assert config.routing.static == {"*": ["relay.test:2525"]}
    assert list(config.routing.credentials()) == [("relay.test", None)]  # the one for --relay's host kept
    assert not _effective_config(args, ("127.0.0.1", 9)).routing.auth  # the sink: none of them
