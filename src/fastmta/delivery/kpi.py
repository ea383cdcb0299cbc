"""Live KPIs: what a campaign, an egress source at a provider, and a sender domain are doing to their reputation.

Three scopes, each a :class:`Series` of counts per key:

* ``campaign`` — the ``job`` meta key (campaign jobs, the HTTP campaign API);
* ``source`` — (egress source, provider): the provider's name for the big
  mailbox providers (:data:`fastmta.delivery.limits.PROVIDERS`: gmail, yahoo,
  outlook, apple), else the site itself; the source by its configured name
  (from the outcome's source IP), else the IP;
* ``sender`` — the envelope sender's domain (a complaint: the domain the
  report names).

The figures (:data:`FIGURES`): ``sent`` (recipients attempted: first
attempts), ``delivered``, ``hard`` (hard bounces, the filter watch's
suspected filter bounces *not* among them), ``suspected_filter`` (counted
apart), ``soft`` (other bounces), ``deferred`` (every transient failure),
``throttled`` (replies of category ``rate_limited``), ``blocked``
(``reputation_block``: blocklist and reputation refusals), ``expired``,
``complaints`` and ``unsubscribes`` (records of the service's feedback
loop, :meth:`Kpis.note_record`; a late ``oob_bounce`` counts as a bounce).

Windows: the last hour in one-minute buckets and the last 24 hours in
ten-minute buckets, plus totals since the process started; a key idle for a
day is forgotten, so memory is bounded by what was active in the last day.
Updating is a few list increments per outcome (an engine listener runs on
the delivery path). Times are wall-clock seconds (the outcome's own time).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from fastmta.delivery.limits import PROVIDERS, limits_for
from fastmta.queue.records import Outcome, Status

__all__ = ["FIGURES", "WINDOWS", "Kpis", "Series", "provider_of", "rates"]

FIGURES = ("sent", "delivered", "hard", "suspected_filter", "soft", "deferred", "throttled", "blocked", "expired",
           "complaints", "unsubscribes")
_I = {name: i for i, name in enumerate(FIGURES)}
SENT, DELIVERED, HARD, SUSPECTED, SOFT, DEFERRED, THROTTLED, BLOCKED, EXPIRED, COMPLAINTS, UNSUBSCRIBES = range(
    len(FIGURES))
_N = len(FIGURES)

#: (name, bucket width in seconds, buckets kept); Series.add has them unrolled.
WINDOWS = (("1h", 60, 60), ("24h", 600, 144))
_DAY = 86400.0

_FIRST_DELIVERY, _DELIVERY = (SENT, DELIVERED), (DELIVERED,)
_ATTEMPTED = (Status.DELIVERED, Status.BOUNCED, Status.DEFERRED, Status.EXPIRED)
_PROVIDER_MEMO: dict[str, str] = {}
K = TypeVar("K")


def provider_of(site: str) -> str:
    """The mailbox provider a site belongs to (gmail, yahoo, ...), else the site itself."""
    name = _PROVIDER_MEMO.get(site)
    if name is None:
        found, _ = limits_for(site, None, providers=PROVIDERS)
        name = site if found == "default" else found
        if len(_PROVIDER_MEMO) > 100_000:
            _PROVIDER_MEMO.clear()
        _PROVIDER_MEMO[site] = name
    return name


def rates(c: dict[str, int]) -> dict[str, float | None]:
    """The rates of a figure dict: bounces per recipient attempted, complaints per delivery, deferrals per attempt."""
    sent, delivered = c["sent"], c["delivered"]
    attempts = delivered + c["hard"] + c["suspected_filter"] + c["soft"] + c["deferred"] + c["expired"]

    def share(n: int, d: int) -> float | None:
        return round(n / d, 5) if d else None

    return {
        "hard_bounce_rate": share(c["hard"], sent), "suspected_filter_rate": share(c["suspected_filter"], sent),
        "soft_bounce_rate": share(c["soft"], sent), "deferral_rate": share(c["deferred"], attempts),
        "complaint_rate": share(c["complaints"], delivered), "unsubscribe_rate": share(c["unsubscribes"], delivered),
    }


class Series:
    """Counts of one key: totals, and per-bucket counts for each window."""

    __slots__ = ("buckets", "last", "total")

    def __init__(self) -> None:
        self.total = [0] * _N
        # Per window: a deque of [bucket id, figure counts...] lists, oldest first.
        self.buckets: tuple[deque[list[int]], ...] = tuple(deque() for _ in WINDOWS)
        self.last = 0.0

    def add(self, t: float, figures: Iterable[int], n: int = 1) -> None:
        if t > self.last:
            self.last = t
        total = self.total
        for f in figures:
            total[f] += n
        hour, day = self.buckets  # unrolled over WINDOWS: this runs for every outcome
        b = int(t // 60)
        cur = hour[-1] if hour and hour[-1][0] == b else _bucket(hour, b, 60)  # the same bucket: most calls
        if cur is not None:
            for f in figures:
                cur[f + 1] += n
        b = int(t // 600)
        cur = day[-1] if day and day[-1][0] == b else _bucket(day, b, 144)
        if cur is not None:
            for f in figures:
                cur[f + 1] += n

    def window(self, name: str, now: float) -> dict[str, int]:
        """The figures of window *name* ("1h", "24h") ending at *now*, or the totals ("total")."""
        if name == "total":
            return dict(zip(FIGURES, self.total))
        i = next(i for i, (w, _, _) in enumerate(WINDOWS) if w == name)
        _, width, kept = WINDOWS[i]
        first = int(now // width) - kept + 1
        sums = [0] * _N
        for bucket in self.buckets[i]:
            if bucket[0] >= first:
                for f in range(_N):
                    sums[f] += bucket[f + 1]
        return dict(zip(FIGURES, sums))


def _forget(table: dict[K, Series], horizon: float) -> None:
    for key in [k for k, s in table.items() if s.last < horizon]:
        del table[key]


def _bucket(ring: deque[list[int]], b: int, kept: int) -> list[int] | None:
    """The bucket *b* of *ring*, made if need be (dropping what left the window); None when *b* is older than
    the window (a late record: in the totals only)."""
    if not ring or b > ring[-1][0]:
        bucket = [b] + [0] * _N
        ring.append(bucket)
        while ring[0][0] <= b - kept:
            ring.popleft()
        return bucket
    if b <= ring[-1][0] - kept:
        return None
    for i in range(len(ring) - 1, -1, -1):
        if ring[i][0] == b:
            return ring[i]
        if ring[i][0] < b:
            bucket = [b] + [0] * _N
            ring.insert(i + 1, bucket)
            return bucket
    bucket = [b] + [0] * _N
    ring.appendleft(bucket)
    return bucket


class Kpis:
    """The KPIs of one engine, fed by :meth:`on_outcome` (an engine listener) and :meth:`note_record`."""

    def __init__(
        self, *, source_of: Callable[[str | None], str | None] | None = None, clock: Callable[[], float] = time.time,
    ) -> None:
        #: Egress source name of an outcome's source IP (None: unknown).
        self.source_of = source_of or (lambda ip: ip)
        self.clock = clock
        self.campaigns: dict[str, Series] = {}
        self.sources: dict[tuple[str, str], Series] = {}
        self.senders: dict[str, Series] = {}
        self._adds = 0

    # --- feeding -----------------------------------------------------------------------

    @staticmethod
    def figures_of(outcome: Outcome) -> tuple[int, ...]:
        """Which figures one outcome counts in."""
        status = outcome.status
        first = outcome.attempts == 1 and status in _ATTEMPTED
        if status is Status.DELIVERED:
            return _FIRST_DELIVERY if first else _DELIVERY
        out: list[int] = [SENT] if first else []
        if status is Status.BOUNCED:
            b = outcome.bounce
            out.append(HARD if b == "hard" else SUSPECTED if b == "suspected_filter" else SOFT)
        elif status is Status.DEFERRED:
            out.append(DEFERRED)
        elif status is Status.EXPIRED:
            out.append(EXPIRED)
        else:
            return ()  # suppressed, deleted, lost: nothing the receivers said
        category = outcome.category
        if category == "rate_limited":
            out.append(THROTTLED)
        elif category == "reputation_block":
            out.append(BLOCKED)
        return tuple(out)

    def on_outcome(self, outcome: Outcome) -> tuple[int, ...]:
        """Count one outcome (engine listener); returns the figures it counted in."""
        return self.add_outcome(outcome, self.source_of(outcome.source_ip))

    def add_outcome(self, outcome: Outcome, source: str | None) -> tuple[int, ...]:
        """:meth:`on_outcome` with the egress source's name already known."""
        figures = self.figures_of(outcome)
        if not figures:
            return figures
        t = outcome.time
        meta = outcome.meta
        job = meta.get("job") if meta else None
        if job is not None:
            self._series(self.campaigns, str(job)).add(t, figures)
        if outcome.site is not None and not outcome.site.startswith("domain:"):
            self._series(self.sources, (source or "default", provider_of(outcome.site))).add(t, figures)
        sender = outcome.sender
        if sender:
            self._series(self.senders, sender.rpartition("@")[2].lower()).add(t, figures)
        return figures

    def note_record(self, record: dict[str, Any]) -> tuple[int, ...]:
        """Count a record of what came back (``complaint``, ``unsubscribe``, ``oob_bounce``); others are ignored.

        Unverified records (``verified`` false: not mapped through our signed
        return path or trace header) count nowhere: a forged report must not
        move a brake.
        """
        kind = record.get("status")
        if record.get("verified") is False:
            return ()
        if kind == "complaint":
            if record.get("feedback_type") == "not-spam":
                return ()
            figures: tuple[int, ...] = (COMPLAINTS,)
        elif kind == "unsubscribe":
            figures = (UNSUBSCRIBES,)
        elif kind == "oob_bounce":
            b = record.get("bounce_type")
            figures = (HARD,) if b == "hard" else (SUSPECTED,) if b == "suspected_filter" else (SOFT,)
        else:
            return ()
        t = float(record.get("time") or self.clock())
        campaign = record.get("campaign")
        if campaign:
            self._series(self.campaigns, str(campaign)).add(t, figures)
        site, source = record.get("site"), self.source_of(record.get("source_ip")) if record.get("source_ip") else None
        if isinstance(site, str) and source:
            self._series(self.sources, (source, provider_of(site))).add(t, figures)
        domain = record.get("sender_domain")
        if isinstance(domain, str) and domain:
            self._series(self.senders, domain.lower()).add(t, figures)
        return figures

    def _series(self, table: dict[K, Series], key: K) -> Series:
        s = table.get(key)
        if s is None:
            s = table[key] = Series()
            self._adds += 1
            if self._adds % 1024 == 0:
                self.forget_idle()
        return s

    def forget_idle(self, now: float | None = None) -> None:
        """Drop the keys with nothing in the last 24 hours."""
        horizon = (self.clock() if now is None else now) - _DAY
        _forget(self.campaigns, horizon)
        _forget(self.sources, horizon)
        _forget(self.senders, horizon)

    # --- reading -----------------------------------------------------------------------

    def figures(self, series: Series, window: str = "total", now: float | None = None) -> dict[str, Any]:
        c: dict[str, Any] = series.window(window, self.clock() if now is None else now)
        c.update(rates(c))
        return c

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """JSON-able: every key's figures and rates over the last hour, the last 24 hours and in total."""
        now = self.clock() if now is None else now
        self.forget_idle(now)
        names = [w for w, _, _ in WINDOWS] + ["total"]

        def windows(s: Series) -> dict[str, Any]:
            return {w: self.figures(s, w, now) for w in names}

        return {
            "windows": names,
            "campaigns": [{"campaign": k, **windows(s)} for k, s in sorted(self.campaigns.items())],
            "sources": [{"source": src, "provider": p, **windows(s)} for (src, p), s in sorted(self.sources.items())],
            "sender_domains": [{"domain": k, **windows(s)} for k, s in sorted(self.senders.items())],
        }
