"""The adaptive throttle inside the real engine, against real sinks on loopback.

Short time scales throughout: retry hints are capped by a small
``queue.retry_max``, the sinks' limits are a few dozen messages per second,
rounds last a fraction of a second and Yahoo's TSS04 suspension is shortened
by a user classification rule (the way an operator would tune it). Each test
is bounded by ``drain``/``wait_for`` timeouts, so a regression fails instead
of hanging.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastmta.delivery.config import Config, config_from_dict
from fastmta.delivery.engine import Engine, Outcome, Status
from fastmta.delivery.throttle import EventKind, ThrottleEvent
from fastmta.feedback.classify import Classifier
from fastmta.sink import FaultConfig, ListenerConfig, RateLimit, SinkConfig, SinkServer

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]

MESSAGE = b"From: a@sender.test\r\nTo: b@dest.test\r\nSubject: throttle\r\n\r\nhello\r\n"
SENDER = "bulk@sender.test"


@asynccontextmanager
async def sink(profile: str, faults: FaultConfig) -> AsyncIterator[tuple[str, SinkServer]]:
    """One in-process sink on 127.0.0.1:0; yields ("127.0.0.1:PORT", server)."""
    server = SinkServer(
        SinkConfig(listeners=(ListenerConfig("127.0.0.1", 0, profile=profile, faults=faults),), starttls=False)
    )
    host, port = (await server.start())[0]
    try:
        yield f"{host}:{port}", server
    finally:
        await server.close()


def config(routes: dict[str, str], sites: dict[str, dict[str, Any]]) -> Config:
    """Static routes domain -> one sink; sites keyed by their exact site name (the sink's host:port)."""
    return config_from_dict(
        {
            "routing": {"static": {domain: [address] for domain, address in routes.items()}},
            "smtp": {"tls": "never", "timeouts": {"connect": 5, "greeting": 5, "mail": 5, "rcpt": 5, "data": 5}},
            # The classifier's hints (greylisting: 420 s, rate limits: 600 s) are a
            # floor under the backoff capped by retry_max: 1 s keeps the tests short.
            "queue": {"retry_initial": 0.3, "retry_max": 1.0, "retry_jitter": 0.1, "max_lifetime": 120},
            "sites": sites,
        }
    )


def adaptive(
    initial_rate: float, *, max_connections: int = 5, round_min: float = 0.25, procedures: bool = True
) -> dict[str, Any]:
    return {
        "max_connections": max_connections,
        "idle_timeout": 2.0,
        "adaptive": {
            "initial_connections": 2, "initial_rate": initial_rate, "round_min": round_min, "procedures": procedures,
        },
    }  # fmt: skip


def cuts(events: list[ThrottleEvent], site: str) -> list[ThrottleEvent]:
    return [e for e in events if e.site == site and e.reason.startswith("throttled:")]


def test_greylisted_recipient_delivered_on_first_retry(run_uvloop: Run[None]) -> None:
    async def scenario() -> None:
        # The sink accepts a greylisted triple 0.5 s after its first try; the
        # engine retries after retry_max (1-1.1 s): the first retry must pass.
        async with sink("default", FaultConfig(greylist=True, greylist_seconds=0.5)) as (address, server):
            cfg = config({"grey.test": address}, {address: adaptive(20.0)})
            async with Engine(cfg) as engine:
                # Take each result future at once: a finished message is forgotten.
                futures = [engine.result(await engine.submit(MESSAGE, SENDER, [f"user{i}@grey.test"])) for i in range(5)]
                assert await engine.drain(15), engine.queue_stats()
                outcomes = [o for fut in futures for o in fut.result()]
                events = list(engine.throttle_events)
        assert [o.status for o in outcomes] == [Status.DELIVERED] * 5
        assert [o.attempts for o in outcomes] == [2] * 5, "each recipient: one greylisted try, one delivered retry"
        assert server.stats.faults["greylist"] == 5
        # Greylisting is about the recipient: the site's window and rate must not be cut.
        assert cuts(events, address) == []

    run_uvloop(scenario())


def test_rate_limited_site_cuts_and_still_delivers_everything(run_uvloop: Run[None]) -> None:
    async def scenario() -> None:
        # Gmail-like: beyond 40 messages/s from our address, 421 4.7.28. The engine
        # starts at 20/s and doubles per clean round, so it must overshoot, be told
        # off, and cut its rate. (The generic loop: Gmail's own procedure for
        # 4.7.28, a 10-minute pause, is switched off here; see test_procedures.py.)
        faults = FaultConfig(rate_limit=RateLimit(rate=40.0, burst=5.0))
        async with sink("gmail", faults) as (address, server):
            cfg = config({"gmail.test": address}, {address: adaptive(20.0, procedures=False)})
            n = 200
            async with Engine(cfg) as engine:
                for i in range(n):
                    await engine.submit(MESSAGE, SENDER, [f"user{i}@gmail.test"])
                assert await engine.drain(40), engine.queue_stats()
                events = list(engine.throttle_events)
                delivered = engine.counts[Status.DELIVERED.value]
        assert delivered == n
        assert server.stats.messages == n
        assert server.stats.faults["rate_limit"] > 0, "the engine never exceeded the sink's rate: nothing tested"
        rate_cuts = [e for e in cuts(events, address) if e.kind is EventKind.RATE]
        assert rate_cuts, [str(e) for e in events]
        assert all(e.new is not None and e.old is not None and e.new < e.old for e in rate_cuts)
        assert "4.7.28" in rate_cuts[0].reason

    run_uvloop(scenario())


def test_suspending_site_suspends_then_resumes_with_a_probe(run_uvloop: Run[None]) -> None:
    async def scenario() -> None:
        # Yahoo-like: a burst above 20/s is answered "421 4.7.0 [TSS04] ...".
        # The built-in rule suspends for 30 minutes; an operator's override of
        # the same rule makes it 1 s here (and Yahoo's procedure, whose pause
        # is as long, is switched off).
        classifier = Classifier.from_rules(
            {
                "rule": [
                    {"name": "yahoo-tss-suspend", "text": [r"\bTSS04\b"], "category": "reputation_block", "suspend": 1.0}
                ]
            }
        )
        faults = FaultConfig(rate_limit=RateLimit(rate=20.0, burst=5.0))
        async with sink("yahoo", faults) as (address, server):
            cfg = config({"yahoo.test": address}, {address: adaptive(40.0, procedures=False)})
            n = 40
            async with Engine(cfg, classifier=classifier) as engine:
                for i in range(n):
                    await engine.submit(MESSAGE, SENDER, [f"user{i}@yahoo.test"])
                assert await engine.drain(40), engine.queue_stats()
                events = [e for e in engine.throttle_events if e.site == address]
                delivered = engine.counts[Status.DELIVERED.value]
        assert delivered == n
        assert server.stats.faults["rate_limit"] > 0  # the sink did answer TSS04
        kinds = [e.kind for e in events]
        assert EventKind.SUSPEND in kinds, [str(e) for e in events]
        first = kinds.index(EventKind.SUSPEND)
        # After the first suspension: a probe, then (its clean reply) a resume, in that order.
        after = kinds[first:]
        assert EventKind.PROBE in after and EventKind.RESUME in after, [str(e) for e in events]
        probe, resume = after.index(EventKind.PROBE), after.index(EventKind.RESUME)
        assert probe < resume
        suspend_event, probe_event = events[first], events[first + probe]
        assert "TSS04" in suspend_event.reason
        # The probe comes when the suspension is over, not before.
        assert probe_event.at - suspend_event.at >= 1.0 - 0.05

    run_uvloop(scenario())


def test_throttled_site_does_not_starve_another(run_uvloop: Run[None]) -> None:
    async def scenario() -> None:
        # A slow site (10 messages/s) with ~15 s of work, and an unlimited one.
        # The unlimited site's messages must all be delivered within a few
        # seconds, while the slow one is still pacing.
        slow_faults = FaultConfig(rate_limit=RateLimit(rate=10.0, burst=5.0))
        async with sink("gmail", slow_faults) as (slow, _), sink("default", FaultConfig()) as (quick, fast_server):
            cfg = config(
                {"slow.test": slow, "fast.test": quick},
                {slow: adaptive(5.0), quick: adaptive(20.0, max_connections=4)},
            )
            engine = Engine(cfg)
            await engine.start()
            try:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                fast: list[asyncio.Future[list[Outcome]]] = []
                for i in range(150):
                    await engine.submit(MESSAGE, SENDER, [f"user{i}@slow.test"])
                    for local in ("user", "other"):
                        fast.append(engine.result(await engine.submit(MESSAGE, SENDER, [f"{local}{i}@fast.test"])))
                results = await asyncio.wait_for(asyncio.gather(*fast), 20)
                fast_done = loop.time() - t0
                slow_left = engine.unfinished
            finally:
                await engine.close(timeout=2)
        assert all(o.status is Status.DELIVERED for outcomes in results for o in outcomes)
        assert fast_server.stats.messages == 300
        # 300 messages to an unlimited local sink take well under a second of
        # sending once the adaptive rate has climbed; 10 s is a generous bound
        # that still lies well inside the slow site's ~15 s of pacing.
        assert fast_done < 10.0, fast_done
        assert slow_left > 50, "the slow site should still be pacing when the fast one is done"

    run_uvloop(scenario())


def test_a_site_held_by_its_rate_does_not_hold_the_others_back(run_uvloop: Run[None]) -> None:
    # Half the recipients go to a site limited to 10 messages a second, the other half to one
    # without limits, interleaved as in a campaign; the read-ahead is 10 recipients. Before,
    # the slow site's waiting recipients filled the read-ahead and the fast half went out at
    # the slow site's pace (49 s for 600 behind 600 at 10/s, measured with `fastmta send`;
    # here the fast half's last one came after ~5 s).
    from servers import postfix_smtp_sink

    n = 120

    async def scenario(slow: str, fast: str) -> None:
        cfg = config_from_dict({
            "routing": {"static": {"slow.test": [slow], "*": [fast]}},
            "smtp": {"tls": "never"},
            "queue": {"max_untried_recipients": 10},
            "sites": {slow: {"rate": ["10/s"], "max_connections": 2, "adaptive": {"enabled": False}},
                      "*": {"max_connections": 4, "adaptive": {"enabled": False}}},
        })  # fmt: skip
        done: dict[str, list[float]] = {"slow": [], "fast": []}
        async with Engine(cfg) as engine:
            loop = asyncio.get_running_loop()
            started = loop.time()

            def seen(outcome: Outcome) -> None:
                if outcome.status is Status.DELIVERED:
                    done["slow" if outcome.recipient.endswith("@slow.test") else "fast"].append(loop.time() - started)

            engine.add_listener(seen)
            for i in range(n):
                domain = "slow.test" if i % 2 == 0 else f"d{i % 7}.test"
                await engine.submit(MESSAGE, SENDER, [f"u{i}@{domain}"])
            assert await engine.drain(30)
            assert engine._room.untried == 0  # every parked recipient came back before it was tried
        assert len(done["slow"]) == len(done["fast"]) == n // 2
        # The slow half takes its ~6 s at 10/s...
        assert max(done["slow"]) >= 4.5
        # ... and the fast half does not wait for it: it is all out within the first second.
        assert max(done["fast"]) < 1.0, sorted(done["fast"])[-5:]

    with postfix_smtp_sink() as slow, postfix_smtp_sink() as fast:
        run_uvloop(scenario(f"{slow.host}:{slow.port}", f"{fast.host}:{fast.port}"))


def test_parked_recipients_stay_in_the_operator_view_and_can_be_bounced(run_uvloop: Run[None]) -> None:
    # The slow site's backlog is parked while its rate holds it; `fastmta queue summary` still
    # counts it as ready, and a bounce of its domain reaches every parked recipient, after which
    # the read-ahead count is back to zero (nothing counted twice or lost).
    from servers import postfix_smtp_sink

    n = 60

    async def scenario(slow: str) -> None:
        cfg = config_from_dict({
            "routing": {"static": {"slow.test": [slow]}}, "smtp": {"tls": "never"},
            "queue": {"max_untried_recipients": 5},
            "sites": {slow: {"rate": ["2/s"], "max_connections": 1, "adaptive": {"enabled": False}}},
        })  # fmt: skip
        async with Engine(cfg) as engine:
            statuses: list[Status] = []
            engine.add_listener(lambda o: statuses.append(o.status))
            for i in range(n):
                await asyncio.wait_for(engine.submit(MESSAGE, SENDER, [f"u{i}@slow.test"]), 5)
            q = next(iter(engine._dispatch.queues.values()))
            assert q.parked, "the backlog beyond the allowance is parked while the rate holds it"
            row = next(r for r in engine.control.summary() if r["kind"] == "site")
            assert row["ready"] + row["in_flight"] + statuses.count(Status.DELIVERED) == n
            bounced = engine.control.bounce("domain:slow.test", "operator")
            assert await engine.drain(10)
            assert not q.parked and not q.ready
            assert engine._room.untried == 0
        assert statuses.count(Status.BOUNCED) == bounced["recipients"] > n // 2
        assert statuses.count(Status.DELIVERED) + statuses.count(Status.BOUNCED) == n

    with postfix_smtp_sink() as slow:
        run_uvloop(scenario(f"{slow.host}:{slow.port}"))


def test_a_site_waiting_only_for_its_connections_parks_nothing(run_uvloop: Run[None]) -> None:
    # Adaptive slow start (the default) and busy connections are not a limit holding mail back:
    # the backlog there is the read-ahead, and stays within its bound.
    from servers import postfix_smtp_sink

    async def scenario(fast: str) -> None:
        cfg = config_from_dict({
            "routing": {"static": {"*": [fast]}}, "smtp": {"tls": "never"},
            "queue": {"max_untried_recipients": 30},
            "sites": {"*": {"max_connections": 1}},
        })  # fmt: skip
        peak = 0
        async with Engine(cfg) as engine:
            for i in range(400):
                await engine.submit(MESSAGE, SENDER, [f"u{i}@d{i % 3}.test"])
                peak = max(peak, sum(len(q.ready) for q in engine._dispatch.queues.values()))
                assert engine._room.untried <= 30
                assert not any(q.parked for q in engine._dispatch.queues.values())
            assert await engine.drain(30)
        assert 10 < peak <= 30  # a backlog formed (the test means something) and stayed within the bound

    with postfix_smtp_sink() as fast:
        run_uvloop(scenario(f"{fast.host}:{fast.port}"))


def test_an_operator_action_elsewhere_leaves_a_held_backlog_parked(run_uvloop: Run[None]) -> None:
    # Found by a review: a bounce (or a suspension) of anything unparked every held site's backlog
    # and left it in the read-ahead until that site's next timer (a rate of 1/min here; a warm-up
    # quota's next day) and the other sites waited again.
    from servers import postfix_smtp_sink

    async def scenario(slow: str, fast: str) -> None:
        cfg = config_from_dict({
            "routing": {"static": {"slow.test": [slow], "*": [fast]}}, "smtp": {"tls": "never"},
            "queue": {"max_untried_recipients": 10},
            "sites": {slow: {"rate": ["1/min"], "max_connections": 1, "adaptive": {"enabled": False}},
                      "*": {"max_connections": 4, "adaptive": {"enabled": False}}},
        })  # fmt: skip
        async with Engine(cfg) as engine:
            for i in range(30):
                await asyncio.wait_for(engine.submit(MESSAGE, SENDER, [f"s{i}@slow.test"]), 5)
            assert engine.control.bounce("domain:nothing.test")["recipients"] == 0
            engine.control.suspend("domain:unrelated.test")
            engine.control.resume("domain:unrelated.test")
            assert engine._room.untried <= 5
            for i in range(20):  # waited for the slow site's next minute before
                await asyncio.wait_for(engine.submit(MESSAGE, SENDER, [f"f{i}@fast.test"]), 2)
            assert engine.control.bounce("domain:slow.test")["recipients"] == 29  # one went out at once
            assert await engine.drain(10)
            assert engine._room.untried == 0

    with postfix_smtp_sink() as slow, postfix_smtp_sink() as fast:
        run_uvloop(scenario(f"{slow.host}:{slow.port}", f"{fast.host}:{fast.port}"))


def test_a_parked_backlog_past_its_lifetime_expires_without_idling(run_uvloop: Run[None]) -> None:
    # Found by a review: batches expiring at the head of the ready queue did not bring parked ones
    # back, so the connection idled its idle_timeout (30 s) with parked work, round after round.
    from servers import postfix_smtp_sink

    async def scenario(slow: str) -> None:
        cfg = config_from_dict({
            "routing": {"static": {"slow.test": [slow]}}, "smtp": {"tls": "never"},
            "queue": {"max_untried_recipients": 5, "max_lifetime": 2},
            "sites": {slow: {"rate": ["1/s"], "max_connections": 1, "pipeline_depth": 1,
                             "adaptive": {"enabled": False}}},
        })  # fmt: skip
        statuses: list[Status] = []
        async with Engine(cfg) as engine:
            engine.add_listener(lambda o: statuses.append(o.status) if o.status.is_final else None)
            for i in range(20):
                await asyncio.wait_for(engine.submit(MESSAGE, SENDER, [f"s{i}@slow.test"]), 5)
            assert await engine.drain(10), statuses
            assert engine._room.untried == 0
        assert len(statuses) == 20 and statuses.count(Status.EXPIRED) >= 10

    with postfix_smtp_sink() as slow:
        run_uvloop(scenario(f"{slow.host}:{slow.port}"))
