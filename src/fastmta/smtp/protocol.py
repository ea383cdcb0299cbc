"""Sans-IO SMTP client protocol (RFC 5321, RFC 2920 PIPELINING, RFC 3030 CHUNKING).

No sockets, no clocks, no event loop. The caller (``connection.py``, or a test)
feeds the bytes it read to :meth:`ClientProtocol.receive_data`, gets events
back, and writes whatever :meth:`ClientProtocol.data_to_send` returns. Modelled
on h11's split between protocol state and I/O.

How commands are paced (the reason this module exists; aiosmtplib cannot
pipeline):

* With PIPELINING, ``MAIL``, every ``RCPT`` and ``DATA`` go out in one write,
  and one read usually brings all their replies. When the ``354`` arrives, the
  message content, its terminating dot *and the next queued transaction's
  envelope* go out in one write, so a reused connection costs one round trip
  per message in the steady state (Postfix's smtp client does the same).
* With CHUNKING (and ``use_bdat``), ``BDAT <n> LAST`` and the content ride in
  the same write as the envelope: one round trip per message, no ``354``.
* Without PIPELINING every command waits for the previous reply (lock-step).

Every reply is matched to the command that caused it through a FIFO of
expectations, so a reply can never be credited to the wrong recipient. A reply
that arrives when nothing was asked, or bytes that are not a reply, raise
:class:`~fastmta.errors.ProtocolError`; the caller then calls :meth:`abort`.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastmta._native import select_implementation
from fastmta.errors import InputError, ProtocolError
from fastmta.smtp import _client_ref
from fastmta.smtp.model import (
    Body,
    Closed,
    Event,
    Extensions,
    Phase,
    Ready,
    SessionFailed,
    SessionState,
    StartTLS,
    TLSPolicy,
    Transaction,
    TransactionDone,
    TransactionResult,
    check_address,
)
from fastmta.smtp.reply import Reply

# The transaction half of the state machine runs once per message; it is
# compiled (``_client.pyx``) with a pure-Python twin (``_client_ref.py``) that
# FASTMTA_NO_EXTENSIONS=1 selects, the same switch as ``fastmta.message.core``.
COMPILED: bool
if TYPE_CHECKING:
    from fastmta.smtp._client_ref import ProtocolCore, ReplyParser
else:
    _impl, COMPILED = select_implementation("fastmta.smtp._client", _client_ref)
    ProtocolCore, ReplyParser = _impl.ProtocolCore, _impl.ReplyParser

__all__ = [
    "COMPILED",
    "Body",
    "ClientProtocol",
    "Closed",
    "Credentials",
    "Event",
    "Extensions",
    "Phase",
    "ProtocolCore",
    "Ready",
    "ReplyParser",
    "SessionFailed",
    "StartTLS",
    "TLSPolicy",
    "Transaction",
    "TransactionDone",
    "TransactionResult",
    "check_address",
]


@dataclass(frozen=True, slots=True)
class Credentials:
    """What to log in with at a relay that asks for it (RFC 4954 SMTP AUTH, PLAIN or LOGIN)."""

    username: str
    password: str = ""
    #: Send them without TLS (never, unless the operator says so: a relay on a private network).
    allow_plaintext: bool = False
    #: The TLS context of a session that carries them, when it must differ from the site's (the
    #: connection's business, not the protocol's): one that verifies the relay's certificate, so the
    #: password goes to the relay and not to whoever answered STARTTLS.
    tls_context: ssl.SSLContext | None = field(default=None, compare=False)

    def __repr__(self) -> str:  # never the password, in a log or a traceback
        return f"Credentials(username={self.username!r}, allow_plaintext={self.allow_plaintext})"


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode("utf-8"))


class ClientProtocol(ProtocolCore):
    """The client side of one SMTP session, as a state machine over bytes.

    This class is the session half: greeting, EHLO (HELO fallback), STARTTLS,
    QUIT and aborts. Transactions are the core's (see ``_client_ref.py``).
    """

    def __init__(
        self,
        helo_name: str,
        *,
        pipelining: bool = True,
        use_bdat: bool = True,
        tls: TLSPolicy = TLSPolicy.NEVER,
        credentials: Credentials | None = None,
    ) -> None:
        if any(ch < " " or ch == "\x7f" for ch in helo_name) or not helo_name:
            raise InputError(f"invalid EHLO name {helo_name!r}")
        super().__init__(pipelining, use_bdat)
        self.helo_name = helo_name
        self.tls_policy = tls
        self.credentials = credentials
        self.authenticated = False
        self._auth_steps: list[bytes] = []  # answers to the relay's 334 challenges to come, in order
        self._auth_refusal: Reply | None = None  # a challenge we could not answer (the login was cancelled)
        self._mechanisms: list[str] = []  # SASL mechanisms offered and not tried yet
        self._hello: Reply | None = None  # the EHLO reply the session becomes ready with
        #: The server's greeting (kept: it names the server, e.g. a filtering appliance).
        self.greeting: Reply | None = None

    def tls_established(self) -> list[Event]:
        """The caller finished the TLS handshake: say EHLO again (RFC 3207)."""
        if self._state != SessionState.TLS:
            raise ProtocolError("tls_established() without a pending STARTTLS")
        self.tls_active = True
        self._set_extensions(Extensions())
        self._state = SessionState.HANDSHAKE
        self._send(b"EHLO " + self._helo_bytes() + b"\r\n", Phase.EHLO)
        return self._drain()

    def quit(self) -> list[Event]:
        """Say QUIT after everything already queued (pipelined behind it if possible)."""
        if self._state >= SessionState.CLOSING:
            return self._drain()
        self._quit_requested = True
        self._maybe_quit()
        return self._drain()

    def abort(self, reply: Reply, phase: Phase | None = None) -> list[Event]:
        """The connection failed (lost, timeout, protocol error): fail what is pending."""
        if self._state != SessionState.CLOSED:
            self._fail_session(reply, phase or self.waiting_for or Phase.QUIT)
        events = self._drain()
        after_dot = Reply.local(reply.code, reply.enhanced or "4.4.2", f"{reply.text} after the end of data "
                                "(the message may have been delivered: it goes again)")
        for event in events:
            # Postfix's "-- message may be sent more than once": an operator reconciling duplicates
            # tells these from a session lost at MAIL, where none is possible.
            if isinstance(event, TransactionDone) and event.result.content_sent \
                    and event.result.final_reply is None and event.result.error is reply:
                event.result.error = after_dot
        return events

    # --- session replies (the core hands over every reply without a transaction) ---

    def _on_session_reply(self, reply: Reply, phase: Phase) -> None:
        if phase is Phase.GREETING:
            self.greeting = reply
            if reply.code == 220:
                self._state = SessionState.HANDSHAKE
                self._send(b"EHLO " + self._helo_bytes() + b"\r\n", Phase.EHLO)
            else:
                self._fail_session(reply, phase)
        elif phase is Phase.EHLO:
            if reply.is_positive:
                self._set_extensions(Extensions.parse(reply))
                self._after_hello(reply)
            elif reply.code in (500, 501, 502, 504, 550) and not self.tls_active:
                # An old server that does not know EHLO: fall back to HELO (RFC 5321 4.1.4).
                self._send(b"HELO " + self._helo_bytes() + b"\r\n", Phase.HELO)
            else:
                self._fail_session(reply, phase)
        elif phase is Phase.HELO:
            if reply.is_positive:
                self._set_extensions(Extensions())
                self._after_hello(reply)
            else:
                self._fail_session(reply, phase)
        elif phase is Phase.STARTTLS:
            if reply.code == 220:
                self._state = SessionState.TLS
                self._events.append(StartTLS())
            elif self.tls_policy is TLSPolicy.REQUIRED:
                self._fail_session(reply, phase)
            else:  # refused: on in clear, as if it was not offered (a relay's login is not sent in clear)
                self._proceed(self._hello or reply)
        elif phase is Phase.AUTH:
            self._on_auth_reply(reply)
        elif phase is Phase.RSET:
            pass  # nothing depends on it; a failing RSET shows up on the next MAIL
        elif phase is Phase.QUIT:
            self._state = SessionState.CLOSED
            self._events.append(Closed(reply))

    def _helo_bytes(self) -> bytes:
        return self.helo_name.encode("idna") if not self.helo_name.isascii() else self.helo_name.encode("ascii")

    def _after_hello(self, reply: Reply) -> None:
        self._hello = reply
        want_tls = self.tls_policy is not TLSPolicy.NEVER and not self.tls_active
        if want_tls and self.extensions.starttls:
            self._send(b"STARTTLS\r\n", Phase.STARTTLS)
        elif want_tls and self.tls_policy is TLSPolicy.REQUIRED:
            self._fail_session(Reply.local(530, "5.7.10", "STARTTLS required but not offered by the server"), Phase.EHLO)
        else:
            self._proceed(reply)

    def _proceed(self, hello: Reply) -> None:
        """After EHLO (and STARTTLS, or its refusal): log in if a relay's credentials are given, else ready."""
        if self.credentials is not None and not self.authenticated:
            self._authenticate(self.credentials)
        else:
            self._become_ready(hello)

    def _authenticate(self, credentials: Credentials) -> None:
        """Log in (RFC 4954) after EHLO (and STARTTLS): PLAIN with its initial response, else LOGIN."""
        if not self.tls_active and not credentials.allow_plaintext:
            self._fail_auth(Reply.local(454, "4.7.0", "no TLS to send the relay's credentials over (STARTTLS not "
                                                      "offered or not used): not sent in clear"))
            return
        keywords = self.extensions.keywords
        # "AUTH=LOGIN PLAIN": the form some servers still advertise, from before RFC 2554 (Postfix reads it).
        offered = " ".join([keywords.get("AUTH", "")] + [k[5:] + " " + v for k, v in keywords.items()
                                                          if k.startswith("AUTH=")])
        mechanisms = offered.upper().split()
        self._mechanisms = [m for m in ("PLAIN", "LOGIN") if m in mechanisms]
        if not self._start_auth(credentials):
            offered = " ".join(mechanisms) or "none"
            self._fail_auth(Reply.local(454, "4.7.0", f"the relay offers no AUTH mechanism fastmta speaks "
                                                      f"(PLAIN, LOGIN; offered: {offered})"))

    def _start_auth(self, credentials: Credentials) -> bool:
        """AUTH with the next mechanism left to try; False when none is."""
        if not self._mechanisms:
            return False
        if self._mechanisms.pop(0) == "PLAIN":
            token = _b64(f"\0{credentials.username}\0{credentials.password}")
            self._auth_steps = [token]  # again after a "334 " from a server that ignores an initial response
            self._send(b"AUTH PLAIN " + token + b"\r\n", Phase.AUTH)
        else:
            self._auth_steps = [_b64(credentials.username), _b64(credentials.password)]
            self._send(b"AUTH LOGIN\r\n", Phase.AUTH)
        return True

    def _on_auth_reply(self, reply: Reply) -> None:
        if reply.code == 334 and self._auth_steps:
            self._send(self._auth_steps.pop(0) + b"\r\n", Phase.AUTH)
        elif reply.code == 334 and self._auth_refusal is None:
            # A challenge with nothing left to answer: cancel (RFC 4954 4: "*"); its 501 ends the login.
            self._auth_refusal = reply
            self._send(b"*\r\n", Phase.AUTH)
        elif reply.code == 504 and self._auth_refusal is None and self.credentials is not None and \
                self._start_auth(self.credentials):
            pass  # that mechanism is not taken after all: the next one
        elif reply.code == 235 and self._auth_refusal is None:
            self.authenticated = True
            self._auth_steps.clear()
            assert self._hello is not None
            self._become_ready(self._hello)
        else:
            self._auth_steps.clear()
            self._fail_auth(Reply.local(454, "4.7.0", f"the relay refused our login: {self._auth_refusal or reply}"))

    def _fail_auth(self, reply: Reply) -> None:
        # Always transient, whatever the relay said (535 included): a login refused is the sender's
        # configuration, not the recipients' address, and must not bounce them (Postfix's
        # smtp_sasl_auth_soft_bounce, on by default). The mail waits for the fix.
        self._fail_session(reply, Phase.AUTH)

    def _become_ready(self, reply: Reply) -> None:
        self._state = SessionState.READY
        self._events.append(Ready(self.extensions, reply))
        self._pump()
