"""Message and recipient records, message ids, and per-recipient outcomes.

These are the units the scheduler moves around. They are deliberately small:
a queued recipient is an address, a domain and a few counters; the message
content is held once per message (``Body``) however many recipients it has.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgspec

from fastmta.errors import InputError
from fastmta.smtp.address import mailbox_error
from fastmta.smtp.dsn_params import DSN_META, dsn_fields
from fastmta.smtp.protocol import Body, check_address
from fastmta.smtp.reply import Reply


class Status(str, Enum):
    """What happened to a recipient (the accounting ``status`` field)."""

    DELIVERED = "delivered"  # final: a server took responsibility (2xx)
    BOUNCED = "bounced"  # final: permanent failure (5xx, null MX, NXDOMAIN)
    EXPIRED = "expired"  # final: transient failures until the queue lifetime ran out
    DEFERRED = "deferred"  # not final: a transient failure, another attempt is scheduled
    LOST = "lost"  # final: accepted, then its queue record or body was damaged beyond recovery (reported)
    DELETED = "deleted"  # final: removed from the queue by an operator, unsent (engine.control.delete)
    SUPPRESSED = "suppressed"  # final: on the suppression list at intake, never queued nor sent (reason in the record)

    @property
    def is_final(self) -> bool:
        return self is not Status.DEFERRED


_counter = 0
# The pid, read once (os.getpid() is a system call) and again in a forked child.
_pid = os.getpid() & 0xFFFF


def _forked() -> None:
    global _pid
    _pid = os.getpid() & 0xFFFF


os.register_at_fork(after_in_child=_forked)


def new_message_id() -> str:
    """A sortable, unique spool id: time in microseconds, pid and a counter, in hex."""
    global _counter
    _counter = (_counter + 1) & 0xFFFFFF
    return f"{time.time_ns() // 1000:x}{_pid:04x}{_counter:06x}"


def split_address(address: str, what: str = "recipient") -> tuple[str, str]:
    """Validate an envelope address and return (address, lower-cased domain).

    Control characters and angle brackets are refused (they would inject SMTP
    commands), so is anything that is not an RFC 5321 mailbox. A trailing dot
    after the domain (``r@example.com.``, the DNS root) is dropped, as Postfix
    does: the address returned is the one to use. (Kept, it went out in RCPT TO,
    drew ``501`` syntax errors counted as hard bounces, and escaped the
    duplicate check of ``r@example.com`` in the same campaign.)
    """
    known = _VALID.get(address)
    if known is not None:
        return known
    check_address(address, what)
    normal = address.removesuffix(".")
    # The RFC 5321 grammar (UTF-8 allowed): "john doe@b.example" would go out
    # in RCPT TO as it is and draw a syntax error, or worse, be misparsed.
    why = mailbox_error(normal)
    if why is not None:
        raise InputError(f"{what} address {address!r} {why}")
    split = (normal, normal.rpartition("@")[2].lower())
    if len(_VALID) >= _VALID_KEPT:
        _VALID.clear()
    _VALID[address] = split
    return split


def mailbox_key(address: str) -> str:
    """What names one mailbox: *address* as split_address gives it (no root's dot), its domain lower-cased;
    the local part as it is (RFC 5321 2.4: ``John@x`` and ``john@x`` may be two mailboxes).
    Raises InputError for one that is no address."""
    normal, domain = split_address(address)
    return f"{normal.rpartition('@')[0]}@{domain}"


def once_each(addresses: Sequence[str]) -> Sequence[str]:
    """*addresses* with each mailbox once (see :func:`mailbox_key`), the first spelling kept: sent one copy
    with one record, as Postfix's cleanup keeps one of duplicate recipients. Raises InputError
    (split_address's) for one that is no address."""
    if len(addresses) < 2:
        return addresses
    seen: set[str] = set()
    out = []
    for a in addresses:
        key = mailbox_key(a)
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


# Addresses found valid lately, with the address to use and its domain. The same
# address is checked several times on its way in (a pickup file's parser, then
# submit(), the same sender for every message): ~1 µs of regexes each time, a
# dict lookup instead. Only valid addresses are kept, so every error is still raised.
_VALID: dict[str, tuple[str, str]] = {}
_VALID_KEPT = 4096


@dataclass(slots=True)
class Recipient:
    """One recipient of one message, with its delivery history so far."""

    address: str
    domain: str
    attempts: int = 0
    status: Status | None = None  # None: never tried
    last_reply: Reply | None = None
    index: int = 0  # position in the message's recipient list (the spool's key for it)
    #: The last failed attempts, oldest first, as the delivery layer's queue
    #: control keeps them (flat pairs: time, what happened); empty until one fails.
    history: tuple[Any, ...] = ()


@dataclass(slots=True)
class Message:
    """An accepted message: one body, one sender, many recipients."""

    id: str
    sender: str
    body: Body
    recipients: list[Recipient]
    queued_at: float = field(default_factory=time.time)  # wall clock, for accounting
    deadline: float = 0.0  # on the engine's loop clock: expire after this
    meta: dict[str, Any] = field(default_factory=dict)  # the caller's, copied to accounting (e.g. job id)


@dataclass(slots=True)
class Outcome:
    """The result of one attempt for one recipient (final or deferred).

    Not frozen: one is made per recipient per attempt, and a frozen
    dataclass pays an ``object.__setattr__`` per field. Treat it as read-only.
    """

    message_id: str
    recipient: str
    status: Status
    reply: Reply
    attempts: int
    queued_at: float
    time: float
    site: str | None = None
    mx_host: str | None = None
    mx_ip: str | None = None
    source_ip: str | None = None
    next_attempt: float | None = None  # wall clock, for deferred outcomes
    meta: dict[str, Any] | None = None
    category: str | None = None  # classify.Category of the reply (None when delivered)
    bounce: str | None = None  # "hard" / "soft" for failures
    sender: str | None = None  # envelope sender ("" is the null sender)
    size: int | None = None  # message size in bytes
    reason: str | None = None  # why the bounce type is what it is, when reviewed (e.g. suspected_filter)
    source: str | None = None  # the egress source's name ([[sources]]; PowerMTA's vmta, KumoMTA's egress_source)
    tls_version: str | None = None  # the session's TLS, when there was one ("TLSv1.3")
    tls_cipher: str | None = None
    #: The next hop offered DSN and was given the client's DSN parameters (it reports on from there).
    next_hop_dsn: bool = False

    def record_fields(self) -> RecordFields:
        """The accounting record's own fields (``as_record`` without the meta keys)."""
        reply = self.reply
        return RecordFields(
            round(self.time, 6), self.message_id, self.recipient, self.status.value, reply.code, reply.enhanced,
            reply.text, self.attempts, round(self.queued_at, 6), round(self.time - self.queued_at, 6), self.sender,
            self.size, self.category, self.bounce, self.site, self.mx_host, self.mx_ip, self.source_ip,
            None if self.next_attempt is None else round(self.next_attempt, 3), self.reason or None,
            self.source, self.tls_version, self.tls_cipher,
        )

    def meta_extra(self) -> dict[str, Any]:
        """The meta keys the record has no field of its own for (a field left out lets its meta key in)."""
        if not self.meta:
            return {}
        # A meta key named like an unset field goes through (the HTTP API's callers had such keys before
        # the fields existed), except the session's: a caller's "tls_version" would claim TLS for mail sent
        # in clear (the HTTP API refuses these keys; see RESERVED_META).
        unset = [name for name, value in (("next_attempt", self.next_attempt), ("bounce_reason", self.reason))
                 if not value]
        taken = _RECORD_FIELDS.difference(unset) if unset else _RECORD_FIELDS
        extra = {k: v for k, v in self.meta.items() if k not in taken}
        if DSN_META in extra:
            extra.update(dsn_fields(extra.pop(DSN_META), self.recipient))
        return extra

    def as_record(self) -> dict[str, Any]:
        """The accounting record (one JSON line): its fields, then the message's other meta keys."""
        record = msgspec.structs.asdict(self.record_fields())
        for name in _OPTIONAL_FIELDS:
            if record[name] is None:
                del record[name]
        record.update(self.meta_extra())
        return record


class RecordFields(msgspec.Struct, omit_defaults=True, gc=False):
    """An outcome's accounting record fields, in order; the two optional ones last, left out when unset.

    A struct, not a dict: the accounting log encodes it directly (half the cost
    of building the dict). ``gc=False``: strings and numbers only, never in a cycle.
    """

    time: float
    message_id: str
    recipient: str
    status: str
    code: int
    enhanced: str | None
    text: str
    attempts: int
    queued_at: float
    time_in_queue: float
    sender: str | None
    size: int | None
    category: str | None
    bounce_type: str | None
    site: str | None
    mx_host: str | None
    mx_ip: str | None
    source_ip: str | None
    next_attempt: float | None = None
    bounce_reason: str | None = None
    source: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None


_RECORD_FIELDS = frozenset(RecordFields.__struct_fields__)
_OPTIONAL_FIELDS = ("next_attempt", "bounce_reason", "source", "tls_version", "tls_cipher")
#: Meta keys a caller may not set: the accounting record's fields of where and how the mail went.
RESERVED_META = frozenset({"source", "tls_version", "tls_cipher"})
