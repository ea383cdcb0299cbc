"""How many SMTP connections the service holds open, in all and per client address.

Without a cap a client (or a botnet, or a sending backend with a runaway
pool) can open connections until the process runs out of file descriptors,
and then the HTTP API, the admin socket and the queue's own files fail with
EMFILE too. Postfix bounds the same two things: ``default_process_limit``
(smtpd processes, so connections) and ``smtpd_client_connection_count_limit``
per client, from which ``smtpd_client_event_limit_exceptions`` (by default
``$mynetworks``) are exempt. So here, per listener (as master.cf limits each
service): the total applies to every client; the per-address cap does not
apply to the relay networks (the service's own backends, which may
legitimately pool many connections).

A refused client gets ``421 4.7.0`` at once, before the greeting, and the
connection is closed: it keeps its mail and retries later (RFC 5321 3.8).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fastmta.sink.replies import format_reply

__all__ = ["ConnectionGate"]


class ConnectionGate:
    """Counts the open connections of one SMTP listener."""

    __slots__ = ("_logged_at", "_unlogged", "by_ip", "max_per_ip", "max_total", "on_refused", "open")

    def __init__(self, max_total: int, max_per_ip: int, on_refused: Callable[[str], None] | None = None) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.open = 0
        self.by_ip: dict[str, int] = {}
        #: Told the reason ("total", "per_ip") of each connection turned away (the service's metrics).
        self.on_refused = on_refused
        self._logged_at = -60.0
        self._unlogged = 0

    def admit(self, ip: str, *, exempt: bool) -> bytes | None:
        """Count a new connection from *ip* and return None, or return the 421 to answer it with.

        *exempt*: the client is in the relay networks (no per-address cap).
        Every admitted connection must be :meth:`release`-d exactly once.
        """
        if self.open >= self.max_total:
            return self._refuse("total", "Error: too many connections, try again later")
        held = self.by_ip.get(ip, 0)
        if not exempt and held >= self.max_per_ip:
            return self._refuse("per_ip", f"Error: too many connections from {ip}")
        self.open += 1
        self.by_ip[ip] = held + 1
        return None

    def release(self, ip: str) -> None:
        self.open -= 1
        held = self.by_ip.get(ip, 0) - 1
        if held > 0:
            self.by_ip[ip] = held
        else:
            self.by_ip.pop(ip, None)

    def _refuse(self, reason: str, text: str) -> bytes:
        if self.on_refused is not None:
            self.on_refused(reason)
        return format_reply(421, "4.7.0", text)

    def log_refusal(self, log: logging.Logger, ip: str, reply: bytes) -> None:
        """A warning at most every 10 s: a flood of refusals is what the caps are for, and must not
        become a flood of log lines (the metric counts every one)."""
        now = time.monotonic()
        if now - self._logged_at < 10.0:
            self._unlogged += 1
            return
        more = f" (and {self._unlogged} more since the last such line)" if self._unlogged else ""
        log.warning("connection from %s refused: %s%s", ip, reply[10:].decode().strip(), more)
        self._logged_at, self._unlogged = now, 0
