"""SMTP injection into the running service: the sink's server state machine, taking mail for real.

The sink already speaks every part of ESMTP this listener needs (PIPELINING,
SIZE, 8BITMIME, SMTPUTF8, CHUNKING, STARTTLS, the exact ``CRLF.CRLF``
framing that no smuggling gets past, slowloris and error limits), so this
module subclasses it instead of writing a second one. It adds:

* **AUTH PLAIN and LOGIN** (RFC 4954, 4616), advertised and accepted only
  under TLS; a failed attempt costs the client a scrypt check, and
  ``max_auth_failures`` of them close the connection.
* **Relay control**: a client that is neither authenticated nor in a relay
  network may only send to the domains the service receives for; any other
  recipient gets 550 5.7.1 at RCPT (no open relay).
* **Durable acceptance**: at end of data the connection stops reading and
  answers nothing until :meth:`ServiceAPI.inject` returns, that is until
  the message is in the journal (group commit). Only then does 250 go out;
  a crash before it leaves the client holding the message, and one after
  it loses nothing. Replies already due are written first, so pipelining
  order is kept.
* A ``Received:`` header (RFC 5321 4.4) whose client-given parts (the HELO
  name) are reduced to safe characters, so a client cannot add a header.
* **DSN** (RFC 3461): ``RET``/``ENVID`` at MAIL, ``NOTIFY``/``ORCPT`` at RCPT,
  checked here (501 for a bad one, as Postfix answers) and kept in the
  message's meta (:mod:`fastmta.smtp.dsn_params`) for the notices
  :mod:`fastmta.serve.sender_notices` sends or leaves unsent.
"""

from __future__ import annotations

import asyncio
import binascii
import email.utils
import logging
import random
import re
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from fastmta.errors import InputError
from fastmta.message.headers import header_section_error, without_mbox_start
from fastmta.queue.records import mailbox_key, split_address
from fastmta.serve.api import ServiceAPI, Unavailable
from fastmta.serve.auth import Accounts, RelayPolicy
from fastmta.serve.gate import ConnectionGate
from fastmta.sink.capture import CaptureWriter
from fastmta.sink.config import ListenerConfig, SinkConfig
from fastmta.sink.listener import ListenerRuntime
from fastmta.sink.profiles import ReplyTemplate
from fastmta.sink.protocol import SinkProtocol
from fastmta.sink.replies import (
    R_HELO_FIRST,
    R_TOO_BIG,
    CompiledReply,
    format_reply,
)
from fastmta.sink.server import SinkServer
from fastmta.sink.syntax import PathError, split_param, split_path
from fastmta.smtp.dsn_params import DSN_META, DsnSyntaxError, parse_envid, parse_notify, parse_orcpt, parse_ret

log = logging.getLogger("fastmta.serve.smtp")

__all__ = ["InjectServer"]

T = TypeVar("T")

R_AUTH_OK = format_reply(235, "2.7.0", "Authentication successful")
R_AUTH_BAD = format_reply(535, "5.7.8", "Authentication credentials invalid")
R_AUTH_NEED_TLS = format_reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
R_AUTH_MECH = format_reply(504, "5.5.4", "Unrecognized authentication type")
R_AUTH_ABORTED = format_reply(501, "5.7.0", "Authentication aborted")
R_AUTH_DECODE = format_reply(501, "5.5.2", "Cannot decode response")
R_AUTH_AGAIN = format_reply(503, "5.5.1", "Error: already authenticated")
R_AUTH_IN_MAIL = format_reply(503, "5.5.1", "Error: MAIL transaction in progress")
R_AUTH_OFF = format_reply(503, "5.5.1", "Error: authentication not enabled")
R_AUTH_TOO_MANY = format_reply(421, "4.7.0", "Error: too many failed authentication attempts, closing connection")
R_AUTH_LOCKED = format_reply(421, "4.7.0", "Error: too many failed logins from your address, try again later")
R_NOT_READY = format_reply(451, "4.3.0", "Error: queue unavailable, try again later")
R_NO_MEMORY = format_reply(452, "4.3.1", "Error: insufficient system storage, try again later")
#: base64 of "Username:" and "Password:" (RFC 4954's LOGIN is not in an RFC, but this is what everyone sends)
R_LOGIN_USER = b"334 VXNlcm5hbWU6\r\n"
R_LOGIN_PASS = b"334 UGFzc3dvcmQ6\r\n"
R_CONTINUE = b"334 \r\n"

#: What may appear of a client's HELO name in our Received: header.
_UNSAFE_HELO = re.compile(rb"[^A-Za-z0-9.:\[\]_-]")
_AUTH_NONE, _AUTH_PLAIN, _AUTH_LOGIN_USER, _AUTH_LOGIN_PASS = 0, 1, 2, 3
#: The DSN parameters of each command, and how each is read (RFC 3461 4.1-4.4).
_DSN_PARAMS: dict[bytes, dict[bytes, Callable[[bytes | None], str]]] = {
    b"MAIL": {b"RET": parse_ret, b"ENVID": parse_envid},
    b"RCPT": {b"NOTIFY": parse_notify, b"ORCPT": parse_orcpt},
}


def _unusable_recipient(addr: bytes) -> str | None:
    """Why the engine would refuse *addr* as a recipient (None: it would not), as reply text."""
    try:
        split_address(addr.decode("utf-8"))
    except UnicodeDecodeError:
        return "Error: the address is not UTF-8"
    except InputError as exc:
        text = exc.reason.encode("ascii", "replace").decode("ascii")
        return f"Error: {text} (this service relays to full addresses; it has no local mailboxes)"
    return None


def _relay_denied(addr: bytes) -> bytes:
    shown = addr.decode("utf-8", "replace")
    return format_reply(550, "5.7.1", f"<{shown}>: Relay access denied")


class InjectProtocol(SinkProtocol):
    """One injection connection. Not for direct use: see :class:`InjectServer`."""

    __slots__ = ("_admitted", "_auth_failures", "_auth_name", "_auth_step", "_dsn", "_helo", "_named", "_relay",
                 "_user")

    def __init__(self, server: InjectServer, listener: ListenerRuntime) -> None:
        super().__init__(server, listener)
        self._user: str | None = None
        self._relay = False
        self._helo = b""
        self._auth_step = _AUTH_NONE
        self._auth_name = ""
        self._auth_failures = 0
        self._admitted: str | None = None  # the address the gate counted this connection under
        #: The DSN parameters of the transaction under way, as kept in its meta (DSN_META).
        self._dsn: dict[str, Any] = {}
        self._named: set[str] = set()  # its recipients, as the engine names them

    def _budget(self) -> CaptureWriter | None:
        host = self._host
        return host.capture if self._relay or self._user is not None else host.capture_untrusted

    @property
    def _host(self) -> InjectServer:
        server = self._server
        assert isinstance(server, InjectServer)
        return server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        host = self._host
        peer = transport.get_extra_info("peername") or ("", 0)
        ip = str(peer[0])
        self._relay = host.policy.trusted(ip)
        refusal = host.gate.admit(ip, exempt=self._relay)
        if refusal is not None:
            # Before the greeting and before the sink counts it: the client keeps its mail.
            host.gate.log_refusal(log, ip, refusal)
            cast(asyncio.Transport, transport).write(refusal)
            transport.close()
            return
        self._admitted = ip
        ready, _ = host.service.ready()
        super().connection_made(transport)
        if not ready:
            # Greeted, then refused at MAIL (451): a client that cannot be
            # served now keeps its mail and retries, and sees why.
            log.debug("connection from %s while not ready", peer[0])

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted is None:
            return  # refused by the gate: never counted as a session
        self._host.gate.release(self._admitted)
        self._admitted = None
        super().connection_lost(exc)

    # ------------------------------------------------------------ commands

    def _command(self, line: bytes) -> None:
        if self._auth_step != _AUTH_NONE:
            self._auth_response(line[:-1] if line[-1:] == b"\r" else line)
            return
        super()._command(line)

    def _ehlo_cmd(self, line: bytes) -> None:
        SinkProtocol._ehlo(self, line)
        if self._greeted:
            self._helo = _UNSAFE_HELO.sub(b"", line[5:].strip())[:64]

    def _mail_cmd(self, line: bytes) -> None:
        if not self._host.service.ready()[0]:
            self._send(R_NOT_READY, 451)
            return
        dsn = self._dsn_params(line)
        if dsn is None:
            return
        line, given = dsn
        open_before = self._sender is not None
        SinkProtocol._mail(self, line)
        if not open_before and self._sender is not None:  # taken: a new transaction, with only its own
            self._dsn = given
            self._named = set()

    def _dsn_params(self, line: bytes) -> tuple[bytes, dict[str, Any]] | None:
        """(*line* without its DSN parameters, for the sink's checks; those parameters read, by their meta
        names), or None when one is refused (answered here). A line that does not parse is left for the
        sink to answer."""
        verb = line[:4].upper()
        start = 10 if verb == b"MAIL" else 8
        try:
            addr, params = split_path(line[start:])
        except PathError:
            return line, {}
        readers = _DSN_PARAMS[verb]
        given: dict[str, Any] = {}
        rest = []
        for param in params:
            key, value = split_param(param)
            reader = readers.get(key)
            if reader is None:
                rest.append(param)
                continue
            if not self._esmtp:
                return line, {}  # the sink refuses any parameter after HELO
            name = key.decode("ascii").lower()
            if name in given:
                self._error(format_reply(501, "5.5.4", f"Error: Duplicate {key.decode()} parameter"), 501)
                return None
            try:
                given[name] = reader(value)
            except DsnSyntaxError as exc:
                self._error(format_reply(501, "5.5.4", f"Error: {exc}"), 501)
                return None
        if not given:
            return line, given
        return b" ".join([line[:start] + b"<" + addr + b">", *rest]), given

    def _rcpt_cmd(self, line: bytes) -> None:
        if self._sender is not None and line[:8].upper() == b"RCPT TO:":
            dsn = self._dsn_params(line)
            if dsn is None:
                return
            line, given = dsn
            try:
                addr, _ = split_path(line[8:])
            except PathError:
                pass  # the sink's handler answers the syntax error
            else:
                domain = addr.rpartition(b"@")[2].decode("utf-8", "replace")
                if not self._relay and not self._host.policy.receives(domain):
                    self._send(_relay_denied(addr), 550)
                    return
                why = _unusable_recipient(addr)
                if why is not None:
                    # Refused here, not after DATA: the engine would refuse the whole message for it
                    # (RCPT TO:<postmaster> got 250, and then every recipient lost the message).
                    self._send(format_reply(553, "5.1.3", why), 553)
                    return
                taken = len(self._rcpts)
                SinkProtocol._rcpt(self, line)
                if len(self._rcpts) > taken:
                    # By the address as the engine will name it (the notice's recipient): unusable ones were refused.
                    address = split_address(addr.decode("utf-8"))[0]
                    if mailbox_key(address) in self._named:
                        # Given twice (its domain in any case): accepted, and kept once, as Postfix's cleanup does
                        # (it went twice, each with its own record; its first DSN parameters stand).
                        self._rcpts.pop()
                        return
                    self._named.add(mailbox_key(address))
                    for name, value in given.items():
                        self._dsn.setdefault(name, {})[address] = value
                return
        SinkProtocol._rcpt(self, line)

    # ---------------------------------------------------------------- AUTH

    def _auth_cmd(self, line: bytes) -> None:
        if not self._greeted or not self._esmtp:
            self._error(R_HELO_FIRST, 503)
            return
        if not self._host.accounts:
            self._error(R_AUTH_OFF, 503)
            return
        if self._user is not None:
            self._error(R_AUTH_AGAIN, 503)
            return
        if self._sender is not None:
            self._error(R_AUTH_IN_MAIL, 503)
            return
        if not self._tls:
            self._send(R_AUTH_NEED_TLS, 538)
            return
        parts = line.split()
        mech = parts[1].upper() if len(parts) > 1 else b""
        initial = parts[2] if len(parts) == 3 else None
        if len(parts) > 3 or mech not in (b"PLAIN", b"LOGIN"):
            self._error(R_AUTH_MECH, 504)
            return
        if mech == b"PLAIN":
            if initial is None:
                self._auth_step = _AUTH_PLAIN
                self._send(R_CONTINUE, 334)
            else:
                self._auth_plain(initial)
        elif initial is None:
            self._auth_step = _AUTH_LOGIN_USER
            self._send(R_LOGIN_USER, 334)
        else:
            self._auth_login_user(initial)

    def _auth_response(self, line: bytes) -> None:
        step, self._auth_step = self._auth_step, _AUTH_NONE
        if line == b"*":
            self._error(R_AUTH_ABORTED, 501)
        elif step == _AUTH_PLAIN:
            self._auth_plain(line)
        elif step == _AUTH_LOGIN_USER:
            self._auth_login_user(line)
        else:
            password = _b64(line)
            if password is None:
                self._error(R_AUTH_DECODE, 501)
            else:
                self._check(self._auth_name, password)

    def _auth_plain(self, data: bytes) -> None:
        raw = _b64(data)
        fields = raw.split("\0") if raw is not None else []
        if len(fields) != 3:
            self._error(R_AUTH_DECODE, 501)
            return
        authzid, authcid, password = fields
        if authzid and authzid != authcid:
            self._fail()  # acting for another identity is not supported
            return
        self._check(authcid, password)

    def _auth_login_user(self, data: bytes) -> None:
        name = _b64(data)
        if name is None:
            self._error(R_AUTH_DECODE, 501)
            return
        self._auth_name = name
        self._auth_step = _AUTH_LOGIN_PASS
        self._send(R_LOGIN_PASS, 334)

    def _check(self, name: str, password: str) -> None:
        """Verify off the loop; the connection reads nothing more until it is answered."""
        accounts = self._host.accounts
        # relay_networks are the operator's own: never locked out (behind one address, many hosts may fail).
        if not self._host.policy.trusted(self._ip) and accounts.guard.refused(self._ip):
            log.info("AUTH refused unchecked for %r from %s: too many failed logins", name, self._ip)
            self._send(R_AUTH_LOCKED, 421)
            self._closing = True
            return
        self._hold()
        task = self._host.track(accounts.verify(name, password))
        task.add_done_callback(lambda t: self._checked(name, accounts, t))

    def _checked(self, name: str, accounts: Accounts, task: asyncio.Future[bool]) -> None:
        ok = not task.cancelled() and task.exception() is None and task.result()
        if ok:
            self._user = name
            self._relay = True
            self._release(R_AUTH_OK, 235, False)
            return
        self._auth_failures += 1
        accounts.guard.failed(self._ip)
        log.info("AUTH failed for %r from %s", name, self._ip)
        # Answered a second later (Postfix's smtpd_error_sleep_time): a guess a second per connection.
        if self._auth_failures >= self._host.max_auth_failures:
            asyncio.get_running_loop().call_later(1.0, self._release, R_AUTH_TOO_MANY, 421, True)
        else:
            asyncio.get_running_loop().call_later(1.0, self._release, R_AUTH_BAD, 535, False)

    def _fail(self) -> None:
        self._auth_failures += 1
        if self._auth_failures >= self._host.max_auth_failures:
            self._send(R_AUTH_TOO_MANY, 421)
            self._closing = True
        else:
            self._send(R_AUTH_BAD, 535)

    # --------------------------------------------------- the end of a message

    def _hold(self) -> None:
        """Stop reading and answering until :meth:`_release`: what is due goes out first."""
        self._held = True
        if self._transport is not None:
            self._transport.pause_reading()

    def _finish_message(self, size: int, content: bytes | None) -> None:
        sender = self._sender if self._sender is not None else b""
        rcpts = self._rcpts
        dsn, self._dsn = self._dsn, {}
        overflow = self._capture_overflow
        self._reset_transaction()
        self._capture_overflow = False
        self._messages += 1
        service = self._host.service
        if size > self._server.config.max_message_size:
            self._stats.rejected_messages += 1
            service.refused("smtp", "too_big")
            self._send(R_TOO_BIG, 552)
            return
        if content is None or overflow:
            # Over the memory budget of messages being received: a 4xx, the client retries.
            self._stats.rejected_messages += 1
            service.refused("smtp", "no_memory")
            self._send(R_NO_MEMORY, 452)
            return
        content = without_mbox_start(content)
        unsafe = header_section_error(content)
        if unsafe is not None:
            # Checked before our Received: header goes on top, so the line number is the client's.
            self._stats.rejected_messages += 1
            service.refused("smtp", "invalid")
            self._send(format_reply(554, "5.6.0", f"Error: message: {unsafe}"), 554)
            return
        qid = f"{self._qid}{self._messages:04X}"
        self._hold()
        self._host.track(self._accept(qid, sender, rcpts, self._received(qid) + content, dsn))

    def _received(self, qid: str) -> bytes:
        protocol = "ESMTP" if self._esmtp else "SMTP"
        if self._tls:
            protocol += "S"
        if self._user is not None:
            protocol += "A"
        helo = self._helo.decode("ascii") or "unknown"
        date = email.utils.formatdate(localtime=False, usegmt=True)
        return (
            f"Received: from {helo} ([{self._ip}])\r\n\tby {self._host.hostname} (fastmta) with {protocol} "
            f"id {qid};\r\n\t{date}\r\n"
        ).encode("ascii")

    async def _accept(self, qid: str, sender: bytes, rcpts: list[bytes], content: bytes,
                      dsn: dict[str, Any]) -> None:
        meta: dict[str, Any] = {}
        if self._user is not None:
            meta["auth"] = self._user
        if dsn:
            meta[DSN_META] = dsn
        try:
            message_id = await self._host.service.inject(
                content, sender.decode("utf-8"), [r.decode("utf-8") for r in rcpts], via="smtp", meta=meta or None
            )
        except InputError as exc:
            self._stats.rejected_messages += 1
            reason = exc.reason.encode("ascii", "replace").decode("ascii")
            self._release(format_reply(554, "5.6.0", f"Error: {reason}"), 554, False)
            return
        except Unavailable as exc:
            self._stats.rejected_messages += 1
            log.warning("message refused (451) from %s: %s", self._ip, exc)
            self._release(R_NOT_READY, 451, False)
            return
        except Exception:  # a bug must cost the client a retry, never the message
            log.exception("accepting a message from %s failed", self._ip)
            self._stats.rejected_messages += 1
            self._host.service.refused("smtp", "error")
            self._release(R_NOT_READY, 451, False)
            return
        self._stats.messages += 1
        self._release(format_reply(250, "2.0.0", f"Ok: queued as {message_id}"), 250, False)


def _b64(data: bytes) -> str | None:
    try:
        return binascii.a2b_base64(data, strict_mode=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


InjectProtocol._handlers = {
    **SinkProtocol._handlers,
    b"EHLO": InjectProtocol._ehlo_cmd,
    b"HELO": InjectProtocol._ehlo_cmd,
    b"MAIL": InjectProtocol._mail_cmd,
    b"RCPT": InjectProtocol._rcpt_cmd,
    b"AUTH": InjectProtocol._auth_cmd,
}


class InjectServer(SinkServer):
    """One SMTP injection listener of the service."""

    protocol_class = InjectProtocol

    def __init__(
        self, config: SinkConfig, *, service: ServiceAPI, policy: RelayPolicy, accounts: Accounts,
        hostname: str, max_auth_failures: int = 3, memory_budget: int = 256 * 1024 * 1024,
        gate: ConnectionGate | None = None,
    ) -> None:
        super().__init__(config)
        self.gate = gate if gate is not None else ConnectionGate(1000, 50)
        self.service = service
        self.policy = policy
        self.accounts = accounts
        self.hostname = hostname
        self.max_auth_failures = max_auth_failures
        # Message content is held in memory while it arrives, against a budget for all connections; those
        # nobody vouches for (outside relay_networks, no login: mail to the receive domains only) have a
        # quarter of it to themselves, or six of them holding 50 MB each without the final dot made every
        # client, trusted ones too, get 452 for as long as they trickled.
        self.capture = CaptureWriter(None, memory_budget - memory_budget // 4)
        self.capture_untrusted = CaptureWriter(None, memory_budget // 4)
        #: Acceptances (journal commits) and AUTH checks under way.
        self.pending: set[asyncio.Task[Any]] = set()

    def track(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return task

    async def close(self, timeout: float = 30.0) -> None:
        """Stop listening; let every message being committed get its answer; then 421 to the rest.

        The order matters: a client told 421 while its message was being
        journaled would send it again (a duplicate); one told 250 must get it.
        """
        for server in self._servers:
            server.close()
        if self.pending:
            await asyncio.wait(set(self.pending), timeout=timeout)
        await asyncio.sleep(0)  # let the answers be written
        await super().close()

    def make_listener(self, lc: ListenerConfig, rng: random.Random, clock: Callable[[], float]) -> ListenerRuntime:
        listener = super().make_listener(lc, rng, clock)
        keywords = [
            "PIPELINING", f"SIZE {self.config.max_message_size}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
            "CHUNKING", "DSN",
        ]
        first = f"{listener.hostname}"
        tls = self.ssl_context is not None
        listener.ehlo = CompiledReply(ReplyTemplate(250, (first, *keywords, *(["STARTTLS"] if tls else []))),
                                      listener.hostname)
        # AUTH only under TLS (RFC 4954 4: no plain-text passwords on the wire).
        auth = ["AUTH PLAIN LOGIN"] if self.accounts else []
        listener.ehlo_tls = CompiledReply(ReplyTemplate(250, (first, *keywords, *auth)), listener.hostname)
        greeting = f"{listener.hostname} ESMTP fastmta"
        listener.greeting = CompiledReply(ReplyTemplate(220, (greeting,)), listener.hostname)
        return listener
