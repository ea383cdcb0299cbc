"""Prometheus metrics for ``fastmta serve``: live engine state, read at each scrape.

Why a custom collector rather than prometheus_client's Counter/Gauge
objects: almost everything here is already counted by the engine (outcomes,
queues, connections, throttles, the spool's writes), so a scrape reads it
where it lives instead of mirroring it on the delivery path. Only two things
are counted here, both in plain dicts keyed by label tuples (a dict update per
event, about 1 µs per outcome, no metric objects on the hot path):

* every outcome, from an :meth:`Engine.add_listener` callback
  (:class:`OutcomeCounter`): recipients by status, category and site, and
  the time final ones spent queued;
* every throttle change, by chaining the engine's throttle event callback
  (:class:`ThrottleEventCounter`): ``engine.throttle_events`` keeps only the
  last 200, which a counter cannot be derived from.

The service counts its intake in an :class:`IntakeStats`. The registry is
the collector's own (never prometheus_client's global one), so two services
or tests in one process do not collide. Label cardinality: sites are bounded
by the destinations mailed (one ready queue each), sources by the
configuration, statuses, categories and event kinds by the code.

Metric names (all ``fastmta_``): see :data:`METRICS`.
"""

from __future__ import annotations

import bisect
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from fastmta.delivery.throttle import ThrottleEvent
from fastmta.queue.commit import COMMIT_TIMINGS, CommitTimings
from fastmta.queue.records import Outcome, Status

if TYPE_CHECKING:
    from fastmta.delivery.engine import Engine
    from fastmta.queue.spool import Spool
    from fastmta.serve.events import EventOutbox

__all__ = [
    "METRICS",
    "EngineCollector",
    "IntakeStats",
    "OutcomeCounter",
    "ServiceMetrics",
    "ThrottleEventCounter",
    "guard_families",
    "render",
]

log = logging.getLogger("fastmta.serve.metrics")

#: Every metric this module exports, with its labels (the HELP texts are in the collector).
METRICS: dict[str, tuple[str, ...]] = {
    "fastmta_outcomes_total": ("status",),
    "fastmta_recipients_total": ("status", "category", "site"),
    "fastmta_time_in_queue_seconds": ("status",),
    "fastmta_unfinished_recipients": (),
    "fastmta_queue_depth": ("site", "state"),
    "fastmta_connections": ("source", "site"),
    "fastmta_connections_opened_total": ("source", "site"),
    "fastmta_transactions_total": ("source", "site"),
    "fastmta_throttle_window": ("source", "site"),
    "fastmta_throttle_rate": ("source", "site"),
    "fastmta_throttle_suspended_seconds": ("source", "site"),
    "fastmta_throttle_events_total": ("source", "site", "kind"),
    "fastmta_filter_held_recipients": (),
    "fastmta_recovered_recipients": (),
    "fastmta_lost_messages": (),
    "fastmta_unresumed_recipients": (),
    "fastmta_engine_fatal": (),
    "fastmta_engine_start_time_seconds": (),
    "fastmta_uptime_seconds": (),
    "fastmta_spool_commit_seconds": (),
    "fastmta_spool_fsyncs_total": (),
    "fastmta_spool_commits_total": (),
    "fastmta_spool_records_total": (),
    "fastmta_spool_bytes_written_total": ("file",),
    "fastmta_spool_compactions_total": (),
    "fastmta_injected_messages_total": ("via",),
    "fastmta_injected_recipients_total": ("via",),
    "fastmta_rejected_messages_total": ("via", "reason"),
    "fastmta_refused_connections_total": ("via", "reason"),
    "fastmta_events_backlog": ("endpoint",),
    "fastmta_events_sent_total": ("endpoint",),
    "fastmta_events_failed_attempts_total": ("endpoint",),
    "fastmta_events_rejected_total": ("endpoint",),
    "fastmta_events_dropped_total": ("endpoint",),
    "fastmta_events_last_success_timestamp_seconds": ("endpoint",),
    "fastmta_events_refused_total": (),
    "fastmta_campaign_kpi": ("campaign", "window", "figure"),
    "fastmta_source_kpi": ("source", "provider", "window", "figure"),
    "fastmta_sender_kpi": ("domain", "window", "figure"),
    "fastmta_guard_paused_campaigns": (),
    "fastmta_guard_sources_out": ("source", "provider"),
    "fastmta_cluster_degraded": (),
    "fastmta_cluster_degraded_episodes_total": (),
    "fastmta_cluster_redis_calls_total": (),
    "fastmta_cluster_throttle_total": ("what",),
    "fastmta_cluster_suppression_changes_total": ("direction",),
    "fastmta_cluster_suppression_backlog": (),
}

#: Time in queue of final outcomes: from a second (a first-attempt delivery) to days (expiry).
QUEUE_TIME_BOUNDS = (1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 3 * 86400.0, 5 * 86400.0)

#: The per-site states engine.control.summary() may report (whatever else it reports is not a depth).
QUEUE_STATES = ("ready", "scheduled", "in_flight", "held", "routing")


class IntakeStats:
    """Mail taken in, by path (``via``: smtp, http, pickup, api): the service calls these."""

    __slots__ = ("messages", "recipients", "refused_connections", "rejections")

    def __init__(self) -> None:
        self.messages: dict[str, int] = {}
        self.recipients: dict[str, int] = {}
        self.rejections: dict[tuple[str, str], int] = {}
        self.refused_connections: dict[tuple[str, str], int] = {}

    def accepted(self, via: str, recipients: int = 1) -> None:
        """One message accepted (durably queued) for *recipients* recipients."""
        self.messages[via] = self.messages.get(via, 0) + 1
        self.recipients[via] = self.recipients.get(via, 0) + recipients

    def rejected(self, via: str, reason: str = "invalid") -> None:
        """One message refused; *reason* is a label: keep it to a few fixed words."""
        key = (via, reason)
        self.rejections[key] = self.rejections.get(key, 0) + 1

    def refused_connection(self, via: str, reason: str) -> None:
        """One connection turned away or closed by a limit (too many, idle, too slow)."""
        key = (via, reason)
        self.refused_connections[key] = self.refused_connections.get(key, 0) + 1


class OutcomeCounter:
    """An engine listener: outcomes by (status, category, site), time in queue of final ones."""

    __slots__ = ("counts", "queue_time")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        #: status -> [bucket counts (last: above every bound), sum]
        self.queue_time: dict[str, tuple[list[int], list[float]]] = {}

    def __call__(self, outcome: Outcome) -> None:
        status = outcome.status
        key = (status.value, outcome.category or "", outcome.site or "")
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        if status is not Status.DEFERRED:
            hist = self.queue_time.get(status.value)
            if hist is None:
                hist = self.queue_time[status.value] = ([0] * (len(QUEUE_TIME_BOUNDS) + 1), [0.0])
            waited = outcome.time - outcome.queued_at
            hist[0][bisect.bisect_left(QUEUE_TIME_BOUNDS, waited)] += 1
            hist[1][0] += waited


class ThrottleEventCounter:
    """Counts throttle events by (source, site, kind), chained before the engine's own callback."""

    __slots__ = ("_previous", "counts")

    def __init__(self, previous: Callable[[ThrottleEvent], None] | None = None) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self._previous = previous

    def __call__(self, event: ThrottleEvent) -> None:
        key = (event.source, event.site, str(event.kind))
        self.counts[key] = self.counts.get(key, 0) + 1
        if self._previous is not None:
            self._previous(event)

    @classmethod
    def attach(cls, engine: Engine) -> ThrottleEventCounter:
        """Put a counter in front of *engine*'s throttle event callback, for its throttles made
        so far (each keeps the callback it was made with) and those made later."""
        throttles = engine.throttles
        counter = cls(throttles.on_event)
        throttles.on_event = counter
        for throttle in throttles:
            if throttle.on_event is counter._previous:
                throttle.on_event = counter
        return counter


def _cumulative(buckets: list[int], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(bounds, buckets):
        total += n
        out.append((repr(float(bound)), total))  # '0.005', '1.0': what the parsers expect
    out.append(("+Inf", total + buckets[-1]))
    return out


def guard_families(summary: dict[str, Any]) -> Iterator[Metric]:
    """The reputation guard's figures (``Guard.summary()``): KPIs over the last hour and day, pauses, rotation."""
    kpis = summary["kpis"]
    windows = [w for w in kpis["windows"] if w != "total"]
    families = (
        ("fastmta_campaign_kpi", "campaigns", ("campaign",), "Recipient figures per campaign over a sliding window."),
        ("fastmta_source_kpi", "sources", ("source", "provider"),
         "Recipient figures per egress source and provider (or site) over a sliding window."),
        ("fastmta_sender_kpi", "sender_domains", ("domain",),
         "Recipient figures per envelope sender domain over a sliding window."),
    )
    for name, scope, keys, help_text in families:
        g = GaugeMetricFamily(name, help_text + " figure: sent (attempted), delivered, hard (suspected filter "
                              "bounces apart), suspected_filter, soft, deferred, throttled, blocked, expired, "
                              "complaints, unsubscribes.", labels=[*keys, "window", "figure"])
        for row in kpis[scope]:
            for w in windows:
                for figure, value in row[w].items():
                    if not figure.endswith("_rate"):
                        g.add_metric([*(str(row[k]) for k in keys), w, figure], value)
        yield g
    yield GaugeMetricFamily("fastmta_guard_paused_campaigns", "Campaigns the reputation guard holds paused.",
                            value=len(summary["paused"]))
    out = GaugeMetricFamily("fastmta_guard_sources_out",
                            "1 for an egress source the guard took out of rotation at a provider.",
                            labels=["source", "provider"])
    for o in summary["sources_out"]:
        out.add_metric([o["source"], o["provider"]], 1)
    yield out


class EngineCollector:
    """Reads the engine (and the intake, spool and outbox figures) at each scrape."""

    def __init__(
        self,
        engine: Engine,
        *,
        outcomes: OutcomeCounter,
        throttle_events: ThrottleEventCounter,
        intake: IntakeStats | None = None,
        spool: Spool | None = None,
        outbox: EventOutbox | None = None,
        commit_timings: CommitTimings = COMMIT_TIMINGS,
    ) -> None:
        self.engine = engine
        self.outcomes = outcomes
        self.throttle_events = throttle_events
        self.intake = intake
        self.spool = spool if spool is not None else engine.spool
        self.outbox = outbox
        self.commit_timings = commit_timings

    def collect(self) -> Iterable[Metric]:
        yield from self._outcomes()
        yield from self._queues()
        yield from self._engine_state()
        guard = getattr(self.engine, "guard", None)
        if guard is not None:
            yield from guard_families(guard.summary())
        if self.spool is not None:
            yield from self._spool()
        if self.intake is not None:
            yield from self._intake(self.intake)
        if self.outbox is not None:
            yield from self._events(self.outbox)
        if getattr(self.engine, "cluster", None) is not None:
            yield from self._cluster()

    def _cluster(self) -> Iterator[Metric]:
        """What this node shares through Redis: whether it can (degraded mode), and what it costs."""
        st = self.engine.cluster.state() if self.engine.cluster is not None else {}
        yield GaugeMetricFamily("fastmta_cluster_degraded",
                                "1 while Redis is unreachable: shared limits kept locally as limit / nodes_hint.",
                                value=1 if st.get("degraded") else 0)
        yield CounterMetricFamily("fastmta_cluster_degraded_episodes_total", "Times Redis became unreachable.",
                                  value=float(st.get("episodes") or 0))
        yield CounterMetricFamily("fastmta_cluster_redis_calls_total",
                                  "Redis round trips of the shared limits, leases and throttle state.",
                                  value=float(st.get("round_trips") or 0))
        throttle = st.get("throttle")
        if isinstance(throttle, dict):
            t = CounterMetricFamily("fastmta_cluster_throttle_total",
                                    "Shared throttle state: cuts and raises this node wrote, cuts refused as "
                                    "already made by another node, states applied from others.", labels=["what"])
            for what in ("cuts", "raises", "refused", "applied"):
                t.add_metric([what], float(throttle.get(what) or 0))
            yield t
        screen = getattr(self.engine, "screen", None)
        store = getattr(screen, "store", None)
        if store is not None and hasattr(store, "backlog"):  # the Redis suppression store
            c = CounterMetricFamily("fastmta_cluster_suppression_changes_total",
                                    "Suppression changes written to Redis (pushed) and applied from it.",
                                    labels=["direction"])
            c.add_metric(["pushed"], float(store.pushed))
            c.add_metric(["applied"], float(store.applied))
            yield c
            yield GaugeMetricFamily("fastmta_cluster_suppression_backlog",
                                    "This node's suppression changes not yet in Redis.", value=float(store.backlog()))

    # --- outcomes -----------------------------------------------------------------------------

    def _outcomes(self) -> Iterator[Metric]:
        m = CounterMetricFamily("fastmta_outcomes_total", "Recipient outcomes (deferrals too) since the engine started, by status.",
                                labels=["status"])
        for status, n in sorted(self.engine.counts.items()):
            m.add_metric([status], n)
        yield m
        m = CounterMetricFamily("fastmta_recipients_total",
                                "Recipient outcomes seen by the metrics listener, by status, reply category and site.",
                                labels=["status", "category", "site"])
        for key, n in sorted(self.outcomes.counts.items()):
            m.add_metric(list(key), n)
        yield m
        h = HistogramMetricFamily("fastmta_time_in_queue_seconds",
                                  "Time from acceptance to a final outcome, by status.", labels=["status"])
        for status, (buckets, total) in sorted(self.outcomes.queue_time.items()):
            h.add_metric([status], _cumulative(buckets, QUEUE_TIME_BOUNDS), total[0])
        yield h

    # --- queues, connections, throttles ---------------------------------------------------------------

    def _queue_rows(self) -> list[dict[str, Any]]:
        try:
            return self.engine.queue_stats()
        except RuntimeError:  # no running loop (a scrape from another thread): nothing live to read
            return []

    def _depths(self, rows: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
        """(site, state) -> amount: from engine.control.summary() when the engine has it, else ready batches."""
        depth: dict[tuple[str, str], float] = {}
        control = getattr(self.engine, "control", None)
        summary = getattr(control, "summary", None)
        result = None
        if callable(summary):
            try:
                result = summary()
            except Exception:  # a scrape must not fail for it: the engine's own figures still answer
                log.exception("engine.control.summary() failed; queue depths from queue_stats()")
        if inspect.iscoroutine(result):  # an async summary cannot be awaited in a scrape: use queue_stats()
            result.close()
            result = None
        if result is not None:
            items: Iterable[tuple[str, Any]]
            if isinstance(result, Mapping):
                items = result.items()
            else:
                items = ((row.get("site", ""), row) for row in result if isinstance(row, Mapping))
            for site, row in items:
                if not isinstance(row, Mapping):
                    continue
                for state in QUEUE_STATES:
                    value = row.get(state)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        depth[(str(site), state)] = depth.get((str(site), state), 0) + value
            return depth
        for row in rows:
            key = (row["site"], "ready")
            depth[key] = depth.get(key, 0) + row["ready"]
        return depth

    def _queues(self) -> Iterator[Metric]:
        rows = self._queue_rows()
        g = GaugeMetricFamily("fastmta_unfinished_recipients", "Recipients accepted and not yet final.",
                              value=self.engine.unfinished)
        yield g
        m = GaugeMetricFamily("fastmta_queue_depth",
                              "Work queued per site by state (engine.control.summary(); without it: ready batches).",
                              labels=["site", "state"])
        for (site, state), n in sorted(self._depths(rows).items()):
            m.add_metric([site, state], n)
        yield m
        conns = GaugeMetricFamily("fastmta_connections", "Open SMTP connections.", labels=["source", "site"])
        opened = CounterMetricFamily("fastmta_connections_opened_total", "SMTP connections opened.",
                                     labels=["source", "site"])
        txns = CounterMetricFamily("fastmta_transactions_total", "SMTP transactions (messages) sent.",
                                   labels=["source", "site"])
        window = GaugeMetricFamily("fastmta_throttle_window", "Connections the throttle allows now.",
                                   labels=["source", "site"])
        rate = GaugeMetricFamily("fastmta_throttle_rate", "Messages per second the adaptive throttle allows now.",
                                 labels=["source", "site"])
        suspended = GaugeMetricFamily("fastmta_throttle_suspended_seconds", "Seconds the site stays suspended.",
                                      labels=["source", "site"])
        for row in rows:
            labels = [row["source"], row["site"]]
            conns.add_metric(labels, row["connections"])
            opened.add_metric(labels, row["connections_opened"])
            txns.add_metric(labels, row["transactions"])
            window.add_metric(labels, row["window"])
            if row["rate"] is not None:
                rate.add_metric(labels, row["rate"])
            suspended.add_metric(labels, row["suspended_for"])
        yield from (conns, opened, txns, window, rate, suspended)
        ev = CounterMetricFamily("fastmta_throttle_events_total",
                                 "Throttle changes (window, rate, suspend, resume, probe, hold, warmup).",
                                 labels=["source", "site", "kind"])
        for key, n in sorted(self.throttle_events.counts.items()):
            ev.add_metric(list(key), n)
        yield ev

    def _engine_state(self) -> Iterator[Metric]:
        e = self.engine
        yield GaugeMetricFamily("fastmta_filter_held_recipients",
                                "'User unknown' verdicts held until the filter watch can judge them.",
                                value=e.filters.held)
        yield GaugeMetricFamily("fastmta_recovered_recipients", "Recipients resumed from the queue at start.",
                                value=e.recovered)
        yield GaugeMetricFamily("fastmta_lost_messages", "Messages the queue could not recover at start.",
                                value=len(e.lost))
        # Not lost (the body may be readable later: an I/O error, a permission) and not being sent:
        # they wait in the queue for the next start, which nothing else in a scrape would show.
        yield GaugeMetricFamily("fastmta_unresumed_recipients",
                                "Recipients of queued messages that could not be read at start (left for the next).",
                                value=e.unresumed)
        yield GaugeMetricFamily("fastmta_engine_fatal",
                                "1 when the engine stopped keeping its record (journal or accounting failed).",
                                value=1 if e.fatal is not None else 0)
        if e.started_at:
            yield GaugeMetricFamily("fastmta_engine_start_time_seconds", "When the engine started (Unix time).",
                                    value=e.started_at)
            yield GaugeMetricFamily("fastmta_uptime_seconds", "Seconds since the engine started.",
                                    value=max(0.0, time.time() - e.started_at))

    # --- spool ----------------------------------------------------------------------------------------

    def _spool(self) -> Iterator[Metric]:
        assert self.spool is not None
        st = self.spool.stats
        t = self.commit_timings
        buckets = list(t.buckets)  # one snapshot: the writer thread may add meanwhile
        h = HistogramMetricFamily("fastmta_spool_commit_seconds",
                                  "Time to write and fsync one group-commit batch (bodies, then journal).")
        h.add_metric([], _cumulative(buckets, t.bounds), t.sum)
        yield h
        yield CounterMetricFamily("fastmta_spool_fsyncs_total", "fsyncs of queue files and directories.", value=st.fsyncs)
        yield CounterMetricFamily("fastmta_spool_commits_total", "Group-commit batches written.", value=st.commits)
        yield CounterMetricFamily("fastmta_spool_records_total", "Journal records written.", value=st.records)
        b = CounterMetricFamily("fastmta_spool_bytes_written_total", "Bytes written to the queue.", labels=["file"])
        b.add_metric(["journal"], st.journal_bytes_written)
        b.add_metric(["data"], st.data_bytes_written)
        yield b
        yield CounterMetricFamily("fastmta_spool_compactions_total", "Journal compactions.", value=st.compactions)

    # --- intake and events --------------------------------------------------------------------------

    def _intake(self, intake: IntakeStats) -> Iterator[Metric]:
        m = CounterMetricFamily("fastmta_injected_messages_total", "Messages accepted, by how they came in.",
                                labels=["via"])
        r = CounterMetricFamily("fastmta_injected_recipients_total", "Recipients of the messages accepted.",
                                labels=["via"])
        for via, n in sorted(intake.messages.items()):
            m.add_metric([via], n)
            r.add_metric([via], intake.recipients.get(via, 0))
        yield m
        yield r
        j = CounterMetricFamily("fastmta_rejected_messages_total", "Messages refused, by how they came in and why.",
                                labels=["via", "reason"])
        for key, n in sorted(intake.rejections.items()):
            j.add_metric(list(key), n)
        yield j
        c = CounterMetricFamily("fastmta_refused_connections_total",
                                "Client connections turned away or closed by a limit, by listener kind and limit.",
                                labels=["via", "reason"])
        for key, n in sorted(intake.refused_connections.items()):
            c.add_metric(list(key), n)
        yield c

    def _events(self, outbox: EventOutbox) -> Iterator[Metric]:
        stats = outbox.stats()
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "backlog": GaugeMetricFamily("fastmta_events_backlog", "Records a webhook has not acknowledged.",
                                         labels=["endpoint"]),
            "sent": CounterMetricFamily("fastmta_events_sent_total", "Records a webhook acknowledged (2xx).",
                                        labels=["endpoint"]),
            "failed_attempts": CounterMetricFamily("fastmta_events_failed_attempts_total",
                                                   "Webhook requests that failed (this process).", labels=["endpoint"]),
            "rejected": CounterMetricFamily("fastmta_events_rejected_total",
                                            "Webhook requests answered 4xx other than 408/429.", labels=["endpoint"]),
            "dropped": CounterMetricFamily("fastmta_events_dropped_total",
                                           "Records deleted unsent by the outbox's max_rows / max_age.",
                                           labels=["endpoint"]),
        }
        last = GaugeMetricFamily("fastmta_events_last_success_timestamp_seconds",
                                 "When a webhook last acknowledged a batch (Unix time).", labels=["endpoint"])
        for name, st in sorted(stats.items()):
            for field, family in families.items():
                family.add_metric([name], getattr(st, field))
            if st.last_success_at is not None:
                last.add_metric([name], st.last_success_at)
        yield from families.values()
        yield last
        yield CounterMetricFamily("fastmta_events_refused_total",
                                  "Records the outbox could not take (not JSON, after close, or unstorable).",
                                  value=outbox.refused + outbox.unstored)


class ServiceMetrics:
    """The service's registry: the engine collector, its two listeners, process metrics.

    Make it after ``engine.start()`` (listeners see outcomes from then on;
    ``fastmta_outcomes_total`` counts from the engine's start anyway).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        intake: IntakeStats | None = None,
        spool: Spool | None = None,
        outbox: EventOutbox | None = None,
        commit_timings: CommitTimings = COMMIT_TIMINGS,
        process: bool = True,
    ) -> None:
        self.registry = CollectorRegistry()
        self.outcomes = OutcomeCounter()
        engine.add_listener(self.outcomes)
        self.throttle_events = ThrottleEventCounter.attach(engine)
        self.collector = EngineCollector(
            engine, outcomes=self.outcomes, throttle_events=self.throttle_events, intake=intake, spool=spool,
            outbox=outbox, commit_timings=commit_timings,
        )
        self.registry.register(self.collector)
        if process:  # process_* (CPU, memory, open files, start time) and python_info
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        return render(self.registry)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition of *registry* and its Content-Type.

    Call it on the engine's loop (the collector reads loop-time state).
    """
    return generate_latest(registry), CONTENT_TYPE_LATEST

