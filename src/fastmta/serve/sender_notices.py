"""Delivery status notifications (RFC 3464) to the senders of mail relayed for others.

A client that hands a message to ``fastmta serve`` over SMTP, HTTP or the
pickup directory and gets 250/202 has handed over the responsibility: if a
recipient then bounces, or expires in the queue, the sender must be told,
as every MTA does (RFC 5321 6.1). Campaign mail is not: its return path is
our own bounce domain, and its outcomes go to accounting and webhooks.

Rules (Postfix's, mostly):

* never to the null sender (a bounce of a bounce would loop), nor to our
  own bounce/FBL domains, nor to a suppressed address;
* one notice per message for the recipients that failed within a short
  window (a message to 50 dead addresses gets one DSN, not 50);
* rate-limited per sender (a flood of bounces must not become a flood of
  DSNs): over the limit, the notice is not sent, and that is logged and
  counted, never silent;
* sent as mail by the engine itself, from ``<>`` with ``Auto-Submitted:
  auto-replied``, returning the original's headers (``text/rfc822-headers``),
  not its content;
* optional delay warnings (``delay_warning_time``, as Postfix's): one per
  message, ``Action: delayed``, when a recipient is still deferred after it;
* what the client asked for over SMTP (DSN, RFC 3461): ``NOTIFY=NEVER`` and a
  ``NOTIFY`` without ``FAILURE`` (``DELAY``) silence the failure (delay)
  notice of that recipient, ``NOTIFY=SUCCESS`` asks for one when the next hop
  takes it (``Action: relayed``), unless that hop offered DSN: the
  parameters are passed on to such a hop (as Postfix does), which then
  reports from there (RFC 3461 6.2.1), ``RET=FULL`` returns the
  whole message in a failure notice (up to :data:`MAX_RETURNED`, else its
  headers, as with ``RET=HDRS`` or none), and ``ENVID``/``ORCPT`` come back
  as ``Original-Envelope-Id``/``Original-Recipient`` (RFC 3464).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

from fastmta.delivery.engine import Engine, EngineClosed
from fastmta.errors import InputError
from fastmta.feedback.suppression import SqliteSuppressionStore
from fastmta.queue.records import Outcome, Status, new_message_id
from fastmta.serve.auth import RelayPolicy
from fastmta.serve.notice_store import KINDS, NoticeStore, OwedNotice, Row, encode
from fastmta.smtp.dsn_params import address_field, dsn_of, notify_of, orcpt_of, orcpt_text, xtext_encode

log = logging.getLogger("fastmta.serve.dsn")

__all__ = ["SenderNotices"]

#: Outcomes of one message gathered this long into one notice.
_GATHER = 1.0
#: Returned headers are capped: a notice is about the message, it does not carry it back.
_MAX_HEADERS = 32 * 1024
#: RET=FULL returns a message up to this size whole; a larger one, its headers (Postfix's bounce_size_limit).
MAX_RETURNED = 50_000
_SUBJECTS = {"failed": "Undelivered Mail Returned to Sender", "delayed": "Delayed Mail (still being retried)",
             "relayed": "Successful Mail Delivery Report"}
_SAYS = {
    "failed": "Your message could not be delivered to the recipient(s) below.",
    "delayed": "Your message has not been delivered yet to the recipient(s) below; it is still being retried.",
    "relayed": ("Your message was handed to the mail server of the recipient(s) below. You may still be told of "
                "errors by other systems after it."),
}
_RELAYED = frozenset({"smtp", "http", "pickup", "api"})


def _clean(text: str) -> str:
    """One line of printable text: what a receiver's reply or an address can put in a notice."""
    return "".join(c if c.isprintable() else " " for c in text)[:900]


class SenderNotices:
    """An engine listener that mails DSNs to the senders of relayed mail."""

    def __init__(
        self, engine: Engine, *, hostname: str, policy: RelayPolicy, store: SqliteSuppressionStore | None,
        delay_warning_time: float = 0.0, per_sender: int = 20, per_seconds: float = 600.0,
        owed: NoticeStore | None = None,
    ) -> None:
        self.engine = engine
        self.hostname = hostname
        self.policy = policy
        self.store = store
        self.delay_warning_time = delay_warning_time
        self.per_sender = per_sender
        self.per_seconds = per_seconds
        # "<message id>:f" (":d", ":r") -> (notice key, sender, outcomes, returned content, kind), for a second
        self._pending: dict[str, tuple[str, str, list[Outcome], bytes, str]] = {}
        #: Where notices wait on disk until queued (None: in memory only, lost with the process).
        self.owed = owed
        self._unsaved: list[Row] = []  # for the next journal batch (before_journal)
        self._owed: list[OwedNotice] = []  # read at start (load_owed), queued by resume()
        self._warned: OrderedDict[str, None] = OrderedDict()
        # (sender, a success notice?) -> when notices went: successes have an allowance of their own (a client
        # asking NOTIFY=SUCCESS for each of many messages must not use up the failures' one).
        self._sent_at: dict[tuple[str, bool], list[float]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.sent = 0
        self.limited = 0

    # ------------------------------------------------------------- listener

    def on_outcome(self, outcome: Outcome) -> None:
        meta = outcome.meta or {}
        # A campaign tag (X-Job, meta job) says nothing of who reads the sender's mail: a client that tagged
        # its mail and asked NOTIFY=FAILURE got no notice at all. A campaign with a signed return path
        # gets none anyway (its sender is one of our own domains: its bounces come back to the loop).
        if meta.get("via") not in _RELAYED or not outcome.sender:
            return
        notify = notify_of(meta, outcome.recipient)  # None: not said; the default is failures and delays
        if outcome.status in (Status.BOUNCED, Status.EXPIRED):
            if notify is None or "FAILURE" in notify:
                self._gather(outcome, "failed")
        elif outcome.status is Status.DELIVERED:
            # Given to a server that takes DSN, the request went with it: that server reports the delivery.
            if notify is not None and "SUCCESS" in notify and not outcome.next_hop_dsn:
                self._gather(outcome, "relayed")
        elif (
            outcome.status is Status.DEFERRED and self.delay_warning_time > 0 and (notify is None or "DELAY" in notify)
            and outcome.time - outcome.queued_at >= self.delay_warning_time and outcome.message_id not in self._warned
        ):
            self._warned[outcome.message_id] = None
            if len(self._warned) > 100_000:
                self._warned.popitem(last=False)
            self._gather(outcome, "delayed")

    def _gather(self, outcome: Outcome, kind: str) -> None:
        gathering = f"{outcome.message_id}:{kind[0]}"
        entry = self._pending.get(gathering)
        if entry is None:
            # The notice's own key, and its message id once queued: unique (a message's later failures
            # make a notice of their own) and kept on disk, so a notice queued again after a crash
            # that is still in the queue is refused as a duplicate instead of going twice.
            key = f"{outcome.message_id}-dsn{kind[0]}{time.time_ns() // 1000:x}"
            msg = self.engine.message(outcome.message_id)  # still tracked: listeners run before it is let go
            returned = b""
            if msg is not None:
                raw = msg.body.raw
                dsn = dsn_of(outcome.meta)
                if kind == "failed" and dsn and dsn.get("ret") == "FULL" and len(raw) <= MAX_RETURNED:
                    returned = raw  # RFC 3461 4.3: the whole message, in failure notices only
                else:
                    end = raw.find(b"\r\n\r\n")
                    returned = raw[: end + 2 if end >= 0 else min(len(raw), _MAX_HEADERS)][:_MAX_HEADERS]
            self._pending[gathering] = (key, outcome.sender or "", [outcome], returned, kind)
            asyncio.get_running_loop().call_later(_GATHER, self._flush, gathering)
            if self.owed is not None:
                self._unsaved.append((key, outcome.sender or "", returned, KINDS.index(kind)))
        else:
            key = entry[0]
            entry[2].append(outcome)
        if self.owed is not None:
            self._unsaved.append((key, encode(outcome)))

    def before_journal(self) -> Future[None] | None:
        """A spool hook (``Spool.before_commit``): store what the notices gathering will say, before
        the journal batch that holds the outcomes they report (the engine calls :meth:`on_outcome` in
        the same call that queues an outcome's journal record)."""
        if self.owed is None or not self._unsaved:
            return None
        rows, self._unsaved = self._unsaved, []
        return self.owed.add(rows)

    def load_owed(self, queued: set[str]) -> int:
        """Read the notices a crash left owed, before the engine starts; how many are to be sent.

        *queued*: the ids of the messages the queue recovered. A notice among them
        was queued before the crash (its id is its key), only its row was not yet
        removed: it is forgotten, not queued again (once the engine has started
        it may be delivered, and untracked, before :meth:`resume` runs).
        """
        if self.owed is None:
            return 0
        self._owed = []
        for n in self.owed.owed():
            if n.key in queued:
                self._forget(n.key)
                continue
            if n.kind == "delayed":
                self._warned[n.outcomes[0].message_id] = None  # one delay warning a message, across a restart too
            self._owed.append(n)
        return len(self._owed)

    def resume(self) -> int:
        """Queue what :meth:`load_owed` read (once the engine has started); how many."""
        owed, self._owed = self._owed, []
        for n in owed:
            self._start(self._send(n.key, n.sender, n.outcomes, n.headers, n.kind))
        if owed:
            log.info("%d delivery status notice(s) left owed by the last run: queued now", len(owed))
        return len(owed)

    def _forget(self, key: str) -> None:
        """The notice *key* is queued, or none goes: nothing is owed for it any more."""
        if self.owed is not None:
            self._unsaved = [row for row in self._unsaved if row[0] != key]
            self.owed.remove(key)

    async def flush_all(self) -> None:
        """Queue every notice still gathering, and wait until each is queued (the service is stopping:
        they were lost with the process, 10 of 10 in an attack on serve)."""
        for key in list(self._pending):
            self._flush(key)
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    def _flush(self, gathering: str) -> None:
        entry = self._pending.pop(gathering, None)
        if entry is None:
            return
        self._start(self._send(*entry))

    def _start(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- sending

    def _allowed(self, sender: str, kind: str) -> str | None:
        domain = sender.rpartition("@")[2]
        if self.policy.receives(domain):
            return "the sender is one of our own bounce/feedback addresses"
        if self.store is not None and self.store.check(sender) is not None:
            return "the sender is suppressed"
        now = time.monotonic()
        key = (sender, kind == "relayed")
        times = [t for t in self._sent_at.get(key, []) if now - t < self.per_seconds]
        if len(times) >= self.per_sender:
            self._sent_at[key] = times
            return f"more than {self.per_sender} {'success ' if key[1] else ''}notices to this sender in {self.per_seconds:g}s"
        times.append(now)
        self._sent_at[key] = times
        if len(self._sent_at) > 100_000:  # forget senders quiet for a whole period
            self._sent_at = {s: ts for s, ts in self._sent_at.items() if ts and now - ts[-1] < self.per_seconds}
        return None

    async def _send(self, key: str, sender: str, outcomes: list[Outcome], returned: bytes, kind: str) -> None:
        why_not = self._allowed(sender, kind)
        if why_not is not None:
            self.limited += 1
            log.warning("no delivery status notice to %r for message %s: %s", sender, outcomes[0].message_id, why_not)
            self._forget(key)
            return
        notice = self.build(sender, outcomes, returned, kind)
        try:
            await self.engine.submit(notice, "", [sender], meta={"via": "dsn", "dsn_for": outcomes[0].message_id},
                                     message_id=key)
        except EngineClosed as exc:  # stopping: owed still, queued by the next start
            log.warning("delivery status notice to %r not queued now (%s): owed to the next start", sender, exc)
            return
        except InputError as exc:
            log.warning("delivery status notice to %r not queued: %s", sender, exc)
            self._forget(key)
            return
        self._forget(key)
        self.sent += 1

    def build(self, sender: str, outcomes: list[Outcome], returned: bytes, kind: str) -> bytes:
        """The RFC 3464 report (multipart/report; report-type=delivery-status) of *kind* (see KINDS).

        *returned*: the original's header section, or the whole message (RET=FULL), told apart by
        the blank line that ends the headers (a header section is stored without it).
        """
        boundary = f"fastmta-{new_message_id()}"
        first = outcomes[0]
        date = email.utils.formatdate(usegmt=True)
        arrival = email.utils.formatdate(first.queued_at, usegmt=True)
        delayed = kind == "delayed"
        lines = [
            f"From: Mail Delivery System <MAILER-DAEMON@{self.hostname}>",
            f"To: <{_clean(sender)}>",
            f"Subject: {_SUBJECTS[kind]}",
            f"Date: {date}",
            f"Message-ID: <{new_message_id()}@{self.hostname}>",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
            "",
            f"--{boundary}",
            "Content-Type: text/plain; charset=utf-8",
            "",
            f"This is the mail system at host {self.hostname}.",
            "",
            _SAYS[kind],
            "",
        ]
        for o in outcomes:
            lines.append(f"<{_clean(o.recipient)}>: {_clean(' '.join(o.reply.lines) or o.reply.text)}")
        lines += ["", f"--{boundary}", "Content-Type: message/delivery-status", ""]
        dsn = dsn_of(first.meta)
        if dsn and isinstance(dsn.get("envid"), str):
            envid = dsn["envid"]  # taken as UTF-8 (Postfix relays that): the part stays ASCII
            lines.append(f"Original-Envelope-Id: {_clean(envid if envid.isascii() else xtext_encode(envid))}")
        lines += [f"Reporting-MTA: dns; {self.hostname}", f"X-Fastmta-Queue-ID: {first.message_id}",
                  f"Arrival-Date: {arrival}", ""]
        for o in outcomes:
            if kind == "relayed":
                status = o.reply.enhanced or "2.0.0"
            else:
                status = o.reply.enhanced or ("4.0.0" if delayed else "5.0.0")
            if o.status is Status.EXPIRED and status.startswith("4"):
                status = "4.4.7"  # RFC 3463: delivery time expired (a failure, still classed 4)
            orcpt = orcpt_of(o.meta, o.recipient)
            if orcpt is not None:
                lines.append(f"Original-Recipient: {_clean(orcpt_text(orcpt))}")
            lines += [f"Final-Recipient: {_clean(address_field(o.recipient))}", f"Action: {kind}", f"Status: {status}"]
            if o.mx_host:
                lines.append(f"Remote-MTA: dns; {_clean(o.mx_host)}")
            if o.reply.code:
                lines.append(f"Diagnostic-Code: smtp; {o.reply.code} {_clean(o.reply.text)}")
            lines.append(f"Last-Attempt-Date: {email.utils.formatdate(o.time, usegmt=True)}")
            lines.append("")
        body = "\r\n".join(lines).encode("utf-8")
        if returned:
            part = "message/rfc822" if b"\r\n\r\n" in returned else "text/rfc822-headers"
            # Then the CRLF that belongs to the delimiter (RFC 2046 5.1.1): the content stays as it was.
            body += f"--{boundary}\r\nContent-Type: {part}\r\n\r\n".encode() + returned + b"\r\n"
        return body + f"--{boundary}--\r\n".encode()
