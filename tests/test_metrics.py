"""The Prometheus metrics of a real engine (spool, sink on loopback), scraped and parsed.

What the scrape says is checked against what happened elsewhere: the sink's
own counters, the engine's outcomes, the spool's write counts.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from fastmta.delivery.config import config_from_dict
from fastmta.delivery.engine import Engine
from fastmta.queue.commit import CommitTimings
from fastmta.queue.records import Status
from fastmta.queue.spool import Spool
from fastmta.serve.events import EventOutbox, WebhookEndpoint
from fastmta.serve.metrics import (
    METRICS,
    EngineCollector,
    IntakeStats,
    OutcomeCounter,
    ServiceMetrics,
    ThrottleEventCounter,
)
from fastmta.sink import FaultConfig, ListenerConfig, PhaseFault, SinkConfig, SinkServer

Run = Callable[[Coroutine[Any, Any, Any]], Any]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

BODY = b"From: a@sender.test\r\nTo: x@y.test\r\nSubject: metrics\r\n\r\nhello\r\n"


def scrape(metrics: ServiceMetrics) -> tuple[Samples, set[str]]:
    """Render, parse with prometheus_client's parser: {(sample name, sorted labels): value}, family names."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples: Samples = {}
    names = set()
    for family in text_string_to_metric_families(body.decode()):
        names.add(family.name)
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, names


def total(samples: Samples, name: str, **match: str) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == name and all(dict(labels).get(k) == want for k, want in match.items()))


async def start_sink(faults: FaultConfig | None = None, seed: int | None = None) -> tuple[SinkServer, str]:
    sink = SinkServer(SinkConfig(listeners=(ListenerConfig("127.0.0.1", 0, faults=faults),), starttls=False,
                                 seed=seed))
    host, port = (await sink.start())[0]
    return sink, f"{host}:{port}"


def engine_config(address: str, **site: Any) -> Any:
    return config_from_dict({
        "routing": {"static": {"*": [address]}},
        "smtp": {"tls": "never", "timeouts": {"connect": 5, "greeting": 5, "mail": 5, "rcpt": 5, "data": 5}},
        "queue": {"retry_initial": 0.1, "retry_max": 0.3, "retry_jitter": 0.0},
        "sites": {"*": {"max_connections": 4, **site}},
    })


def test_a_scrape_agrees_with_the_sink_the_spool_and_the_intake(run: Run, tmp_path: Path) -> None:
    async def main() -> None:
        faults = FaultConfig(replies=(PhaseFault("rcpt", 0.3, 451, "4.3.0 try again later"),))
        sink, address = await start_sink(faults, seed=7)
        spool = Spool(tmp_path / "queue")
        # Adaptive, so that the 451s make throttle events, with a floor that keeps the test quick.
        cfg = engine_config(address, adaptive={"enabled": True, "initial_connections": 2, "initial_rate": 1000.0,
                                               "min_rate": 500.0, "round_min": 0.1})
        # The outbox's endpoint is down: its backlog is every outcome.
        outbox = EventOutbox(tmp_path / "events", [WebhookEndpoint(url="http://127.0.0.1:9/hook", name="down")])
        try:
            async with Engine(cfg, spool=spool, rng=random.Random(1)) as engine:
                engine.add_listener(outbox.on_outcome)
                intake = IntakeStats()
                metrics = ServiceMetrics(engine, intake=intake, spool=spool, outbox=outbox)
                futures = []
                for i in range(60):
                    futures.append(engine.result(await engine.submit(BODY, "s@sender.test", [f"u{i}@d{i % 3}.test"])))
                    intake.accepted("http" if i % 2 else "smtp", 1)
                intake.rejected("smtp")
                intake.rejected("pickup", "unreadable")
                outcomes = [o for r in await asyncio.wait_for(asyncio.gather(*futures), 30) for o in r]
                assert {o.status for o in outcomes} == {Status.DELIVERED}
                samples, names = scrape(metrics)
                counted = sum(engine.counts.values())
                throttle_events = len(engine.throttle_events)
                sites = {o.site for o in outcomes}
        finally:
            await outbox.close(timeout=0)
            await spool.close()
            await sink.close()

        deferred = sink.stats.faults["rcpt"]
        assert deferred > 0 and sink.stats.messages == 60
        # Outcomes: as the sink saw them (one recipient per message).
        assert total(samples, "fastmta_recipients_total", status="delivered") == 60
        assert total(samples, "fastmta_recipients_total", status="deferred") == deferred
        assert total(samples, "fastmta_outcomes_total", status="delivered") == 60
        assert total(samples, "fastmta_outcomes_total", status="deferred") == deferred
        assert {dict(labels)["site"] for (n, labels) in samples if n == "fastmta_recipients_total"} == sites
        assert total(samples, "fastmta_recipients_total", status="deferred", category="") == 0  # categorised
        assert total(samples, "fastmta_time_in_queue_seconds_count", status="delivered") == 60
        assert total(samples, "fastmta_time_in_queue_seconds_bucket", status="delivered", le="+Inf") == 60
        # Queues: nothing left, the connections' work counted.
        assert total(samples, "fastmta_unfinished_recipients") == 0
        assert total(samples, "fastmta_queue_depth", state="ready") == 0
        assert total(samples, "fastmta_transactions_total") == sink.stats.transactions
        assert total(samples, "fastmta_connections_opened_total") == sink.stats.connections
        assert total(samples, "fastmta_throttle_window") >= 1
        assert total(samples, "fastmta_throttle_events_total") == throttle_events > 0
        # The spool: every group commit timed, one histogram consistent with itself.
        commits = total(samples, "fastmta_spool_commit_seconds_count")
        assert commits > 0 and total(samples, "fastmta_spool_commit_seconds_bucket", le="+Inf") == commits
        assert total(samples, "fastmta_spool_fsyncs_total") > 0 and total(samples, "fastmta_spool_records_total") > 60
        # Intake, as the service counted it.
        assert total(samples, "fastmta_injected_messages_total", via="http") == 30
        assert total(samples, "fastmta_injected_messages_total", via="smtp") == 30
        assert total(samples, "fastmta_injected_recipients_total") == 60
        assert total(samples, "fastmta_rejected_messages_total", via="smtp", reason="invalid") == 1
        assert total(samples, "fastmta_rejected_messages_total", via="pickup", reason="unreadable") == 1
        # Events: every outcome waits for the endpoint that is down.
        assert total(samples, "fastmta_events_backlog", endpoint="down") == counted == 60 + deferred
        assert total(samples, "fastmta_events_sent_total", endpoint="down") == 0
        # Uptime and the process.
        assert total(samples, "fastmta_uptime_seconds") > 0 and total(samples, "fastmta_engine_fatal") == 0
        assert "process_start_time_seconds" in names or "process_cpu_seconds" in names
        # Every family the module documents that this engine has is there (rate: no adaptive rate row needed;
        # the cluster's only with [cluster]: tests/test_cluster_metrics.py).
        families = {n.removesuffix("_total") for n in METRICS if not n.startswith("fastmta_cluster_")}
        assert families - names <= {"fastmta_throttle_rate", "fastmta_events_last_success_timestamp_seconds"}

    run(main())


def test_queue_gauges_while_work_waits(run_uvloop: Run) -> None:
    async def main() -> None:
        sink, address = await start_sink(FaultConfig(delays=(("mail", 1.0),)))
        cfg = engine_config(address, max_connections=1, adaptive={"enabled": False})
        try:
            async with Engine(cfg) as engine:
                metrics = ServiceMetrics(engine, process=False)
                for i in range(10):
                    await engine.submit(BODY, "s@sender.test", [f"u{i}@d.test"])
                for _ in range(200):  # until the one connection is open and sitting in MAIL
                    if sink.stats.active_connections:
                        break
                    await asyncio.sleep(0.01)
                samples, names = scrape(metrics)
                assert not any(n.startswith("process_") for n in names)
                await engine.close(timeout=0.1)
        finally:
            await sink.close()
        assert total(samples, "fastmta_unfinished_recipients") == 10
        assert total(samples, "fastmta_queue_depth", state="ready") >= 8  # one batch per message; one is sending
        assert total(samples, "fastmta_connections") == 1
        assert "fastmta_spool_commit_seconds" not in names  # no spool: no spool metrics

    run_uvloop(main())


class _FakeEngine:
    """What the collector reads, with engine.control (another module's) present."""

    def __init__(self, summary: Any) -> None:
        self.counts: dict[str, int] = {}
        self.unfinished = 7
        self.spool = None
        self.recovered = 0
        self.lost: list[Any] = []
        self.unresumed = 0
        self.fatal = None
        self.started_at = 0.0
        self.filters = type("F", (), {"held": 0})()
        self.control = type("C", (), {"summary": staticmethod(lambda: summary)})()

    def queue_stats(self) -> list[dict[str, Any]]:
        return []


def test_queue_depths_come_from_engine_control_when_it_is_there() -> None:
    from prometheus_client import CollectorRegistry

    from fastmta.serve.metrics import render

    rows = [{"site": "a", "source": "s1", "ready": 3, "scheduled": 2, "in_flight": 1, "label": "x"},
            {"site": "a", "source": "s2", "ready": 1, "scheduled": 0, "in_flight": 0}]
    for summary in (rows, {"b": {"ready": 4, "scheduled": 5, "in_flight": 6}}):
        registry = CollectorRegistry()
        engine: Any = _FakeEngine(summary)
        registry.register(EngineCollector(engine, outcomes=OutcomeCounter(), throttle_events=ThrottleEventCounter(),
                                          commit_timings=CommitTimings()))
        body, _ = render(registry)
        samples: Samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        depth = {(dict(lb)["site"], dict(lb)["state"]): v for (n, lb), v in samples.items() if n == "fastmta_queue_depth"}
        if isinstance(summary, list):
            assert depth == {("a", "ready"): 4, ("a", "scheduled"): 2, ("a", "in_flight"): 1}
        else:
            assert depth == {("b", "ready"): 4, ("b", "scheduled"): 5, ("b", "in_flight"): 6}
        assert total(samples, "fastmta_unfinished_recipients") == 7


def test_commit_timings_buckets() -> None:
    t = CommitTimings((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.002, 0.5):
        t.observe(seconds)
    assert t.buckets == [2, 1, 1] and t.count == 4 and abs(t.sum - 0.5035) < 1e-9


def test_a_queued_message_unreadable_at_start_shows_in_a_scrape(run: Run, tmp_path: Path) -> None:
    # Found by reading the resume path: a queued message whose body cannot be read at start (an I/O
    # error, not damage) waits for the next start; serve logged it once and no scrape showed it.
    async def add() -> None:
        spool = Spool(tmp_path / "queue")
        await spool.add_message("m1", "s@a.test", ["r1@b.test", "r2@b.test"], BODY)
        await spool.close()

    async def main() -> float:
        spool = Spool(tmp_path / "queue")
        async with Engine(engine_config("127.0.0.1:9"), spool=spool) as engine:
            samples, names = scrape(ServiceMetrics(engine, intake=IntakeStats(), spool=spool))
        assert "fastmta_unresumed_recipients" in names
        return total(samples, "fastmta_unresumed_recipients")

    run(add())
    [segment] = [p for p in (tmp_path / "queue" / "data").iterdir() if p.is_file()]
    segment.unlink()
    segment.mkdir()  # reading it fails with EISDIR (as root, a mode cannot make it fail)
    assert run(main()) == 2
