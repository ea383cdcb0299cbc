"""When what came back from a receiver becomes a suppression (the defaults are documented in README).

=========================================  ========================================  ==========
what came back                              suppression                               default
=========================================  ========================================  ==========
hard bounce (the mailbox does not exist)    global                                    on
soft bounces of the same recipient          global, after N within M days             5 in 30
complaint (ARF feedback report)             that sender domain, permanent             on
unsubscribe (one-click or mailto:)          that list or campaign tag                 on
a block of *us* (reputation, auth,          never: the address is fine, our mail      --
policy, rate, content, infrastructure)      was not
suspected B2B filter bounce                 never (reported, not suppressed)          --
=========================================  ========================================  ==========
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastmta.feedback.classification import BounceType, Category, Classification
from fastmta.feedback.suppression import Scope, SqliteSuppressionStore, Suppression

__all__ = ["NEVER_SUPPRESS", "SuppressionPolicy"]

#: Categories that say something about the sender or the path, not the recipient.
NEVER_SUPPRESS = frozenset({
    Category.REPUTATION_BLOCK, Category.AUTH_FAILURE, Category.POLICY, Category.RATE_LIMITED,
    Category.CONTENT_FILTERED, Category.SPAM_OR_VIRUS, Category.MESSAGE_FORMAT, Category.MESSAGE_TOO_LARGE,
    Category.RELAY_DENIED, Category.SENDER_REJECTED, Category.REMOTE_SYSTEM, Category.NETWORK,
    Category.PROTOCOL_ERROR, Category.GREYLISTED, Category.EXPIRED, Category.AUTO_REPLY, Category.UNKNOWN,
    Category.DELIVERED, Category.COMPLAINT,
})

_DAY = 86400.0


@dataclass(frozen=True, slots=True)
class SuppressionPolicy:
    soft_bounce_limit: int = 5
    soft_bounce_days: float = 30.0
    never: frozenset[Category] = field(default=NEVER_SUPPRESS)

    def on_bounce(
        self, store: SqliteSuppressionStore, address: str, c: Classification, text: str = "", at: float | None = None
    ) -> Suppression | None:
        """Record a bounce in the recipient's history; the suppression it leads to, if any (already added)."""
        now = time.time() if at is None else at
        store.note_bounce(address, c.bounce.value, c.category.value, now)
        if c.bounce is BounceType.SUSPECTED_FILTER or c.category in self.never:
            return None
        if c.bounce is BounceType.HARD:
            s = Suppression(address, Scope.GLOBAL, "", f"hard bounce ({c.category.value}): {text}"[:500],
                            "hard_bounce", now)
        elif c.bounce is BounceType.SOFT:
            n = store.soft_bounces_since(address, now - self.soft_bounce_days * _DAY)
            if n < self.soft_bounce_limit:
                return None
            s = Suppression(address, Scope.GLOBAL, "",
                            f"{n} soft bounces in {self.soft_bounce_days:g} days ({c.category.value})",
                            "soft_bounces", now)
        else:
            return None
        store.add(s)
        return s

    def on_complaint(self, store: SqliteSuppressionStore, address: str, sender_domain: str | None,
                     feedback_type: str = "abuse", at: float | None = None) -> Suppression:
        """Never again from *sender_domain*; from anyone when the report does not say which (a report
        whose quoted message has no From): the recipient complained, and guessing a domain (the
        report's own address) would suppress nothing."""
        scope, value = (Scope.DOMAIN, sender_domain.lower()) if sender_domain else (Scope.GLOBAL, "")
        s = Suppression(address, scope, value, f"complaint ({feedback_type})", "complaint",
                        time.time() if at is None else at)
        store.add(s)
        return s

    def on_unsubscribe(self, store: SqliteSuppressionStore, address: str, list_tag: str, how: str = "one-click",
                       at: float | None = None) -> Suppression:
        s = Suppression(address, Scope.LIST, list_tag, f"unsubscribe ({how})", "unsubscribe",
                        time.time() if at is None else at)
        store.add(s)
        return s
