"""The loop back from receivers: outcomes and inbound reports become suppressions and records.

Three sources feed the suppression store (``DATA_DIR/suppression.db``, SQLite WAL):

* the engine's own outcomes (an engine listener): a hard bounce suppresses,
  N soft bounces in M days suppress, a delivery is noted in the recipient's
  history (the false-hard-bounce detector reads "delivered recently");
* mail received for the bounce/FBL/unsubscribe domains (``DATA_DIR/inbound``,
  written durably by the service before it said 250): read by
  :func:`fastmta.feedback.inbound.read_inbound` into out-of-band bounces,
  complaints, unsubscribes and auto-replies;
* one-click unsubscribes (RFC 8058 POSTs to the HTTP listener).

Each becomes an accounting record (``oob_bounce``, ``complaint``,
``unsubscribe``, ``auto_reply``...) that also goes to the webhooks. Only
*verified* events (mapped through our signed return path or trace header)
suppress: a forged bounce must not unsubscribe anybody.

Writes go through one worker thread with its own database connection, in
batches (one transaction per batch, like the spool's group commit): a burst
of 10,000 deliveries or 2,000 one-click POSTs a second is a few commits, and
the event loop never waits for SQLite. A caller that must know its change
is durable (the one-click endpoint answers 200 only then) awaits it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastmta.errors import Scope
from fastmta.feedback.classification import BounceType, Category, Classification, Outcome
from fastmta.feedback.classify import Classifier
from fastmta.feedback.inbound import InboundEvent, read_inbound
from fastmta.feedback.suppression import SqliteSuppressionStore, Suppression
from fastmta.feedback.suppression_policy import SuppressionPolicy
from fastmta.message.returnpath import ReturnPath
from fastmta.queue.records import Outcome as DeliveryOutcome
from fastmta.queue.records import Status
from fastmta.serve.inbound_store import prune_kept

log = logging.getLogger("fastmta.serve.feedback")

__all__ = ["FeedbackLoop"]

#: A batch is written after this long or this many changes, whichever comes first.
_BATCH_DELAY = 0.005
_BATCH_MAX = 2000
#: Deliveries are noted in the recipient history this often (one batch for all of them).
_HISTORY_DELAY = 1.0

Change = Callable[[SqliteSuppressionStore], "Suppression | None"]


def _classification(category: str | None, bounce: str | None) -> Classification | None:
    try:
        return Classification(Outcome.PERMANENT, Category(category or "unknown"), BounceType(bounce or "none"),
                              Scope.RECIPIENT)
    except ValueError:
        return None  # a category of the operator's own rules, or none: nothing a policy acts on


class FeedbackLoop:
    """Owns the suppression store's writer; the service owns the loop-side reader (``store``)."""

    def __init__(
        self, data_dir: Path, *, policy: SuppressionPolicy | None = None, return_path: ReturnPath | None = None,
        classifier: Classifier | None = None, unsubscribe: Callable[[str, str], tuple[str, str] | None] | None = None,
        emit: Callable[[dict[str, Any]], None] = lambda _r: None, store: SqliteSuppressionStore | None = None,
        keep_unrecognized: tuple[float, int] = (30 * 86400.0, 1 << 30),
    ) -> None:
        self.data_dir = data_dir
        self.inbound_dir = data_dir / "inbound"
        path = data_dir / "suppression.db"
        #: For the intake check (loop thread): reads, and its in-memory filter. *store*: one on the same file
        #: (a RedisSuppressionStore: the writer's suppressions go to its backlog, note_suppressed pushes them).
        self.store = store if store is not None else SqliteSuppressionStore(path)
        self._writer: SqliteSuppressionStore | None = None
        self._path = path
        self.policy = policy or SuppressionPolicy()
        self.return_path = return_path
        self.classifier = classifier
        self.unsubscribe_token = unsubscribe
        self._emit = emit
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastmta-suppression")
        self._pending: list[tuple[Change, asyncio.Future[Suppression | None] | None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self.counts: dict[str, int] = {}
        self.commits = 0  # transactions written (each a batch of changes)
        #: What nobody could read is kept this long (seconds), within this many bytes (see prune_kept).
        self.keep_unrecognized = keep_unrecognized
        self._pruned_at = 0.0
        self._delivered: dict[str, tuple[float, int]] = {}  # address -> (last delivery, deliveries), not yet written
        self._history_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._writer = await loop.run_in_executor(self._executor, SqliteSuppressionStore, self._path)
        self._flusher = asyncio.ensure_future(self._flush_loop())
        # Mail received before a crash and not yet read: read it now (it was acknowledged with 250).
        for path in sorted(self.inbound_dir.glob("*.eml")):
            await self.process(path)

    async def close(self) -> None:
        if self._history_task is not None:
            self._history_task.cancel()
        self._flush_history()
        self._closed = True
        self._wake.set()
        if self._flusher is not None:
            await self._flusher
        await self._write(self._take())
        loop = asyncio.get_running_loop()
        if self._writer is not None:
            await loop.run_in_executor(self._executor, self._writer.close)
        self._executor.shutdown(wait=True)
        self.store.close()

    # ------------------------------------------------------------- changes

    def _submit(self, change: Change, *, wait: bool) -> asyncio.Future[Suppression | None] | None:
        fut: asyncio.Future[Suppression | None] | None = None
        if wait:
            fut = asyncio.get_running_loop().create_future()
        self._pending.append((change, fut))
        if len(self._pending) == 1 or len(self._pending) >= _BATCH_MAX:
            self._wake.set()
        return fut

    def _take(self) -> list[tuple[Change, asyncio.Future[Suppression | None] | None]]:
        batch, self._pending = self._pending, []
        return batch

    async def _flush_loop(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(_BATCH_DELAY)  # let a burst gather into one transaction
            while self._pending:
                await self._write(self._take())

    async def _write(self, batch: list[tuple[Change, asyncio.Future[Suppression | None] | None]]) -> None:
        if not batch:
            return
        writer = self._writer
        assert writer is not None

        def run() -> list[Suppression | BaseException | None]:
            results: list[Suppression | BaseException | None] = []
            with writer.transaction():  # one transaction for the batch: one fsync instead of one per change
                for change, _ in batch:
                    try:
                        results.append(change(writer))
                    except Exception as exc:  # one bad change must not lose the others
                        results.append(exc)
            return results

        self.commits += 1
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        except Exception as exc:
            log.error("suppression store: a batch of %d change(s) could not be written: %s", len(batch), exc)
            for _, fut in batch:
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), result in zip(batch, results):
            if isinstance(result, Suppression):
                self.store.note_suppressed(result.address)  # the intake check sees it from now on
            if fut is not None and not fut.done():
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
            elif isinstance(result, BaseException):
                log.error("suppression store: %s", result)

    # ----------------------------------------------------- the engine's outcomes

    def on_outcome(self, outcome: DeliveryOutcome) -> None:
        """Engine listener: deliveries into the history, bounces through the policy."""
        address = outcome.recipient
        if outcome.status is Status.DELIVERED:
            # History, not a promise: gathered in memory (the latest delivery per address) and written
            # once a second in one statement batch, not one statement and commit per delivery (which cost
            # more CPU than the delivery itself at a thousand a second). A crash loses at most a second of
            # "last delivered" notes; no suppression depends on them.
            _, n = self._delivered.get(address, (0.0, 0))
            self._delivered[address] = (outcome.time, n + 1)
            if self._history_task is None or self._history_task.done():
                self._history_task = asyncio.ensure_future(self._history_later())
        elif outcome.status is Status.BOUNCED and outcome.bounce in ("hard", "soft"):
            c = _classification(outcome.category, outcome.bounce)
            if c is None:
                return
            text, at = outcome.reply.text, outcome.time
            self._submit(lambda store: self.policy.on_bounce(store, address, c, text, at), wait=False)

    async def _history_later(self) -> None:
        await asyncio.sleep(_HISTORY_DELAY)
        self._flush_history()

    def _flush_history(self) -> None:
        delivered, self._delivered = self._delivered, {}
        if delivered:
            self._submit(lambda store: store.note_delivered_many((a, t, n) for a, (t, n) in delivered.items()),
                         wait=False)

    # --------------------------------------------------------- one-click unsubscribe

    async def record_unsubscribe(self, address: str, list_tag: str, how: str = "one-click") -> None:
        """The one-click endpoint's record callback (see :func:`fastmta.serve.unsubscribe.add_unsubscribe_routes`)."""
        await self.unsubscribe(address, list_tag, how)

    async def unsubscribe(self, address: str, list_tag: str, how: str = "one-click") -> Suppression | None:
        """Record an unsubscribe; returns once it is committed (the caller may then answer 200)."""
        fut = self._submit(lambda store: self.policy.on_unsubscribe(store, address, list_tag, how), wait=True)
        assert fut is not None
        result = await fut
        self._record({"status": "unsubscribe", "recipient": address, "campaign": list_tag, "how": how,
                      "suppressed": result is not None})
        return result

    # ------------------------------------------------------------ inbound mail

    async def process(self, path: Path) -> list[InboundEvent]:
        """Read one received message, act on what it says, record it; then the file goes."""
        try:
            raw = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            log.error("inbound %s: cannot read: %s", path.name, exc)
            return []
        envelope_from, envelope_to, body = _split_envelope(raw)
        try:
            events = await asyncio.to_thread(
                read_inbound, body, envelope_from, envelope_to, return_path=self.return_path,
                classifier=self.classifier, unsubscribe=self.unsubscribe_token,
            )
        except Exception as exc:  # kept for the operator, reported; the service goes on
            log.exception("inbound %s: unreadable", path.name)
            events = [InboundEvent("unrecognized", "", diagnostic=f"unreadable: {exc}"[:200], envelope_from=envelope_from)]
        for event in events:
            suppressed = await self._act(event)
            record = {"status": event.kind, **event.as_record(), "inbound_id": path.stem}
            if suppressed is not None:
                record["suppressed"] = f"{suppressed.scope.value}:{suppressed.value}" if suppressed.value else "global"
            self._record(record)
        keep = any(e.kind == "unrecognized" for e in events)
        try:
            if keep:  # nobody could read it: kept for the operator to look at, for a while
                (self.inbound_dir / "unrecognized").mkdir(exist_ok=True, mode=0o700)
                os.replace(path, self.inbound_dir / "unrecognized" / path.name)
                if time.monotonic() - self._pruned_at > 60 or not self._pruned_at:  # a listing a minute at most
                    self._pruned_at = time.monotonic()
                    await asyncio.to_thread(prune_kept, self.inbound_dir / "unrecognized", *self.keep_unrecognized)
            else:
                path.unlink()
        except OSError as exc:
            log.error("inbound %s: %s", path.name, exc)
        return events

    async def _act(self, event: InboundEvent) -> Suppression | None:
        if not event.verified or not event.recipient:
            return None
        rcpt = event.recipient
        if event.kind == "oob_bounce":
            c = _classification(event.category, event.bounce_type)
            if c is None:
                return None
            text = event.diagnostic
            fut = self._submit(lambda store: self.policy.on_bounce(store, rcpt, c, text), wait=True)
        elif event.kind == "complaint" and event.feedback_type not in _NOT_THE_RECIPIENTS_WISH:
            domain = event.sender_domain
            kind = event.feedback_type or "abuse"
            fut = self._submit(lambda store: self.policy.on_complaint(store, rcpt, domain, kind), wait=True)
        elif event.kind == "unsubscribe" and event.list_tag:
            tag = event.list_tag
            fut = self._submit(lambda store: self.policy.on_unsubscribe(store, rcpt, tag, "mailto"), wait=True)
        else:
            return None
        assert fut is not None
        try:
            return await fut
        except Exception as exc:
            log.error("inbound: could not record %s of %s: %s", event.kind, rcpt, exc)
            return None

    def _record(self, record: dict[str, Any]) -> None:
        record.setdefault("time", round(time.time(), 6))
        kind = str(record.get("status"))
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._emit(record)


#: Reports that are no complaint by the recipient: "not spam", and RFC 6591's authentication-failure
#: and RFC 5965's virus reports (about our DKIM/SPF or content: a matter for the sender, and no reason
#: to stop mailing the recipient who never asked for it).
_NOT_THE_RECIPIENTS_WISH = frozenset({"not-spam", "auth-failure", "virus", "dmarc"})


def _split_envelope(raw: bytes) -> tuple[str, list[str], bytes]:
    """The envelope the service wrote on top of a received message (X-Fastmta-Envelope-*), and the message."""
    sender, rcpts = "", []
    pos = 0
    while True:
        end = raw.find(b"\r\n", pos)
        if end < 0:
            break
        line = raw[pos:end]
        if line.startswith(b"X-Fastmta-Envelope-From: <"):
            sender = line[26:-1].decode("utf-8", "replace")
        elif line.startswith(b"X-Fastmta-Envelope-To: <"):
            rcpts.append(line[24:-1].decode("utf-8", "replace"))
        else:
            break
        pos = end + 2
    return sender, rcpts, raw[pos:]
