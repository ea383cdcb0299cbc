"""The suppression check at intake: every path (campaign rows, pickup, SMTP, HTTP, ``submit()``) passes here.

:meth:`Screen.admit` runs inside :meth:`Engine.submit`, before the message
is journaled, so a suppressed recipient is never queued nor sent; it gets a
final accounting record (status ``suppressed``, with the suppression's
scope, source and reason) instead. The common case (nobody suppressed) is
one hash and one in-memory lookup per recipient
(:meth:`SqliteSuppressionStore.maybe`); only a possible hit computes what
the narrower scopes need (the From domain for a complaint's sender-domain
scope, the campaign for a list unsubscribe) and asks the database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from fastmta.feedback.suppression import SqliteSuppressionStore, Suppression
from fastmta.message.dkim_policy import from_domain
from fastmta.queue.records import Outcome, Status
from fastmta.smtp.reply import Reply

__all__ = ["Screen", "list_tag_of"]


def list_tag_of(meta: dict[str, Any] | None) -> str:
    """The list a message belongs to: the campaign (``job``), or an explicit ``list`` meta field."""
    if not meta:
        return ""
    return str(meta.get("list") or meta.get("job") or "")


def _sender_domain(raw: bytes) -> str:
    """The From domain (a complaint's suppression is per sender domain); "" when there is none."""
    end = raw.find(b"\r\n\r\n")
    lines = raw[: end if end >= 0 else len(raw)].split(b"\n")
    for i, line in enumerate(lines):
        if line[:5].lower() == b"from:":
            field = [line]
            for more in lines[i + 1 :]:
                if more[:1] not in (b" ", b"\t"):
                    break
                field.append(more)
            domain, _ = from_domain(b"\n".join(field))
            return domain or ""
    return ""


class Screen:
    """Keeps suppressed recipients out of the queue; *record* gets one outcome for each."""

    def __init__(self, store: SqliteSuppressionStore, record: Callable[[Outcome], None]) -> None:
        self.store = store
        self._record = record
        self.suppressed = 0

    def admit(
        self, message_id: str, sender: str, recipients: Sequence[str], raw: bytes, meta: dict[str, Any] | None,
    ) -> Sequence[str]:
        """The recipients that may be queued; each other one is recorded as suppressed."""
        self.store.follow_if_due()  # what another process (fastmta suppress) added meanwhile
        maybe = self.store.maybe
        for r in recipients:  # a plain loop: no generator frame on the path every recipient takes
            if maybe(r):
                break
        else:
            return recipients
        domain, tag = _sender_domain(raw), list_tag_of(meta)
        kept: list[str] = []
        for r in recipients:
            hit = self.store.check(r, domain, tag) if maybe(r) else None
            if hit is None:
                kept.append(r)
            else:
                self._suppressed(message_id, sender, r, hit, len(raw), meta)
        return kept

    def _suppressed(
        self, message_id: str, sender: str, recipient: str, s: Suppression, size: int, meta: dict[str, Any] | None
    ) -> None:
        self.suppressed += 1
        now = time.time()
        scope = s.scope.value + (f":{s.value}" if s.value else "")
        reply = Reply.local(550, "5.7.1", f"suppressed ({scope}, {s.source}): {s.reason}"[:400])
        self._record(Outcome(
            message_id, recipient, Status.SUPPRESSED, reply, 0, now, now, meta=meta or None, category="suppressed",
            bounce="none", sender=sender, size=size, reason=f"{scope} {s.source}",
        ))
