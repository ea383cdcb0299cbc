"""The report of a load run: ``LoadResult``, its time series, live ``Progress``, and merging.

:class:`LoadResult` holds the counts, the per-phase latency histograms
(:data:`PHASES`) and the time series (:class:`Interval` per slot) of one run;
``as_dict()`` is the JSON form documented in :mod:`fastmta.load.schema`.
:func:`merge_results` and :meth:`Progress.merge` combine what several worker
processes report into one view (histograms merge by adding counts). Filling
these in while the load runs is :mod:`fastmta.load.measure`'s job.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from fastmta.load.histogram import Histogram

PHASES = ("queue", "connect", "greeting", "ehlo", "envelope", "end_of_data", "message")
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass(slots=True)
class Interval:
    """One time-series slot: counts by when they happened, and the message latencies completed in it."""

    sent: int = 0
    completed: int = 0
    accepted: int = 0
    failed: int = 0
    latency: Histogram = field(default_factory=Histogram)

    def merge(self, other: Interval) -> None:
        self.sent += other.sent
        self.completed += other.completed
        self.accepted += other.accepted
        self.failed += other.failed
        self.latency.merge(other.latency)


@dataclass(slots=True)
class LoadResult:
    """The report. ``messages_per_s`` counts messages accepted by the server.

    ``as_dict()`` is the documented JSON form (see ``fastmta.load.schema``);
    the histograms and the time series stay available as objects.
    """

    target: str
    messages_requested: int | None
    mode: str = "closed"
    workers: int = 1
    connections: int = 0
    duration_s: float | None = None
    rate_target: float | None = None
    ramp_s: float = 0.0
    messages_attempted: int = 0
    messages_accepted: int = 0
    recipients_accepted: int = 0
    recipients_refused: int = 0
    messages_failed: int = 0
    messages_unsent: int = 0  # due (open loop) or requested but never handed to a connection
    connections_opened: int = 0
    connect_failures: int = 0
    replies: dict[str, int] = field(default_factory=dict)  # final decisive reply per recipient, by code
    errors: dict[str, int] = field(default_factory=dict)  # session-level failures by reason
    errors_by_code: dict[str, int] = field(default_factory=dict)  # failed messages by their decisive reply code
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    messages_per_s: float = 0.0
    cpu_us_per_message: float = 0.0
    rate_achieved: float | None = None  # open loop: completions per second inside the rate window
    rate_window_s: float = 0.0
    completed_in_window: int = 0
    timed_out: bool = False
    complete: bool = False
    interval_s: float = 1.0
    workload: dict[str, Any] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=lambda: {p: Histogram() for p in PHASES})
    series: list[Interval] = field(default_factory=list)

    @property
    def reply_classes(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for code, n in self.replies.items():
            out[f"{code[0]}xx"] += n
        return dict(out)

    def latency_ms(self, phase: str) -> dict[str, float]:
        h = self.histograms[phase]
        p = h.percentiles(PERCENTILES)
        return {
            "count": h.count,
            "min": h.min / 1e3,
            "mean": round(h.mean / 1e3, 3),
            "max": h.max / 1e3,
            **{_pname(q): p[q] / 1e3 for q in PERCENTILES},
        }

    def as_dict(self) -> dict[str, Any]:
        """The JSON report (schema: ``fastmta.load.schema.SCHEMA``)."""
        out: dict[str, Any] = {"schema": "fastmta-load/1"}
        for name in (
            "target", "mode", "workers", "connections", "messages_requested", "duration_s", "rate_target",
            "ramp_s", "rate_achieved", "rate_window_s", "messages_attempted", "messages_accepted",
            "messages_failed", "messages_unsent", "recipients_accepted", "recipients_refused",
            "connections_opened", "connect_failures", "replies", "errors", "errors_by_code", "elapsed_s",
            "cpu_s", "messages_per_s", "cpu_us_per_message", "timed_out", "complete", "workload",
        ):
            out[name] = getattr(self, name)
        out["reply_classes"] = self.reply_classes
        out["latency_ms"] = {phase: self.latency_ms(phase) for phase in PHASES}
        points = []
        for k, iv in enumerate(self.series):
            p = iv.latency.percentiles((50.0, 99.0))
            points.append({
                "t": round(k * self.interval_s, 6), "sent": iv.sent, "completed": iv.completed,
                "accepted": iv.accepted, "failed": iv.failed, "p50_ms": p[50.0] / 1e3, "p99_ms": p[99.0] / 1e3,
                "max_ms": iv.latency.max / 1e3,
            })
        out["series"] = {"interval_s": self.interval_s, "points": points}
        return out

    def derive(self) -> None:
        """Recompute the figures that follow from the counts."""
        e = self.elapsed_s
        self.messages_per_s = self.messages_accepted / e if e > 0 else 0.0
        self.cpu_us_per_message = self.cpu_s * 1e6 / self.messages_attempted if self.messages_attempted else 0.0
        if self.rate_target is not None:
            self.rate_achieved = self.completed_in_window / self.rate_window_s if self.rate_window_s > 0 else 0.0
        everything_sent = (
            self.messages_unsent == 0
            and (self.messages_requested is None or self.messages_attempted >= self.messages_requested)
            and (self.messages_attempted > 0 or self.messages_requested == 0)
        )
        self.complete = not self.timed_out and everything_sent and self.messages_failed == 0


def _pname(q: float) -> str:
    return "p" + f"{q:g}".replace(".", "_")


def merge_results(results: list[LoadResult]) -> LoadResult:
    """One report from several processes' reports (same target, same start time)."""
    if not results:
        raise ValueError("nothing to merge")
    first = results[0]
    out = replace(first, histograms={p: Histogram() for p in PHASES}, series=[], replies={}, errors={},
                  errors_by_code={}, workload=dict(first.workload))
    out.workers = len(results)
    for name in ("messages_attempted", "messages_accepted", "recipients_accepted", "recipients_refused",
                 "messages_failed", "messages_unsent", "connections_opened", "connect_failures",
                 "completed_in_window", "connections"):
        setattr(out, name, sum(getattr(r, name) for r in results))
    requested = [r.messages_requested for r in results]
    out.messages_requested = None if any(n is None for n in requested) else sum(n or 0 for n in requested)
    if first.rate_target is not None:
        out.rate_target = sum(r.rate_target or 0.0 for r in results)
    out.cpu_s = sum(r.cpu_s for r in results)
    out.elapsed_s = max(r.elapsed_s for r in results)
    out.timed_out = any(r.timed_out for r in results)
    for name in ("replies", "errors", "errors_by_code"):
        total: Counter[str] = Counter()
        for r in results:
            total.update(getattr(r, name))
        setattr(out, name, dict(total))
    for r in results:
        for phase, h in r.histograms.items():
            out.histograms[phase].merge(h)
        while len(out.series) < len(r.series):
            out.series.append(Interval())
        for k, iv in enumerate(r.series):
            out.series[k].merge(iv)
    out.derive()
    return out


@dataclass(frozen=True, slots=True)
class Progress:
    """What the live display shows; sent every ``progress_interval`` seconds."""

    elapsed_s: float
    sent: int
    completed: int
    accepted: int
    failed: int
    requested: int | None
    sent_per_s: float  # over the last full interval
    reply_classes: dict[str, int]
    p50_ms: float  # message latency over the last full interval
    p99_ms: float
    connect_failures: int
    # The last full interval's latencies, so that worker processes' views can be merged.
    latency: Histogram | None = None

    @staticmethod
    def merge(parts: list[Progress]) -> Progress:
        h = Histogram.merged(p.latency for p in parts if p.latency is not None)
        classes: Counter[str] = Counter()
        for p in parts:
            classes.update(p.reply_classes)
        reqs = [p.requested for p in parts]
        pct = h.percentiles((50.0, 99.0))
        return Progress(
            elapsed_s=max(p.elapsed_s for p in parts), sent=sum(p.sent for p in parts),
            completed=sum(p.completed for p in parts), accepted=sum(p.accepted for p in parts),
            failed=sum(p.failed for p in parts),
            requested=None if any(r is None for r in reqs) else sum(r or 0 for r in reqs),
            sent_per_s=sum(p.sent_per_s for p in parts), reply_classes=dict(classes),
            p50_ms=pct[50.0] / 1e3, p99_ms=pct[99.0] / 1e3,
            connect_failures=sum(p.connect_failures for p in parts), latency=h,
        )

