"""Adaptive throttling against provider-like receivers (issue 5, "Evaluation" and acceptance item 3).

Four sites, each an in-process ``fastmta sink`` listener on its own loopback
address, reached through static routes:

* **gmail-like** (gmail profile): 5 connections per client IP (``421 4.7.0``
  beyond) and 20 messages/s per client IP (``421 4.7.28`` beyond); the rate
  limit is raised (default to 40/s) halfway through the run.
* **greylisting** (default profile): every new (sender, recipient, IP)
  triple is greylisted for a few seconds.
* **suspending** (yahoo profile): 10 messages/s with a small burst; a burst
  beyond it is answered ``421 4.7.0 [TSS04]`` and the sender is refused for a
  few seconds (see ``LiveRateLimit``).
* **unlimited** (default profile): no limits; a fixed number of messages.

The same scenario runs twice at the same time, on separate sinks, source
addresses and engines: once with the adaptive throttle, once with a static
configuration whose fixed limits lie above the receivers' (the baseline).
One process, one event loop: the sinks are in-process because two things
the sink's CLI cannot do are needed (raising a limit mid-run, suspending a
sender after a burst); both are done through a rate-limit object whose
public attributes the sink reads on every MAIL (see ``LiveRateLimit``).

Run ``python bench/bench_throttle.py --help``; ``--quick`` takes < 2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from fastmta.delivery.config import Config, config_from_dict
from fastmta.delivery.engine import Engine, Status
from fastmta.delivery.throttle import EventKind, ThrottleEvent
from fastmta.feedback.classify import Classifier
from fastmta.sink import (
    FaultConfig,
    ListenerConfig,
    RateLimit,
    SinkConfig,
    SinkServer,
    SinkStats,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import text_table

MESSAGE = b"From: news@sender.test\r\nTo: you@dest.test\r\nSubject: throttle bench\r\n\r\n" + b"x" * 1500 + b"\r\n"
SENDER = "news@sender.test"
SITES = ("gmail", "grey", "yahoo", "free")
#: Sink fault counters that are throttle-class replies (greylisting is about the recipient, not the sender).
THROTTLE_FAULTS = ("rate_limit", "max_connections")
#: Seconds between two samples of every throttle's dials.
SAMPLE_EVERY = 0.25


# --------------------------------------------------------------------------
# A rate limit the sink reads live


class LiveRateLimit:
    """Stands in for :class:`fastmta.sink.config.RateLimit`, with attributes that change at run time.

    The sink's fault engine reads ``rate_limit.rate`` and ``rate_limit.burst``
    on every MAIL, so assigning ``rate``/``burst`` raises or lowers the limit
    in a running sink, and a ``rate`` of (almost) zero refuses everything.
    With ``suspend`` > 0 the receiver *suspends on bursts*: once it has
    refused a MAIL for exceeding the bucket (its ``stats.faults["rate_limit"]``
    grew), it refuses every MAIL for ``suspend`` seconds, whatever the sender
    does meanwhile; refusals during a suspension do not extend it.
    The sink's own config offers no such knob (see the README).
    """

    def __init__(
        self, rate: float, burst: float, *, suspend: float = 0.0,
        stats: SinkStats | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._rate = rate
        self.burst = burst
        self.suspend = suspend
        self.stats = stats
        self.clock = clock
        self.suspended_until = -math.inf
        self.suspensions: list[float] = []  # start times
        self._refused_seen = 0
        self._last_read = -math.inf

    @property
    def rate(self) -> float:
        if self.suspend > 0 and self.stats is not None:
            now = self.clock()
            refused = self.stats.faults["rate_limit"]
            # The sink reads this once per MAIL, before deciding; so a refusal
            # counted since the last read was the answer to the previous MAIL,
            # and the suspension starts then (not at the next MAIL, which may
            # come much later: that would suspend the sender's next probe).
            if refused > self._refused_seen and self._last_read >= self.suspended_until:
                self.suspended_until = self._last_read + self.suspend
                self.suspensions.append(self._last_read)
            self._refused_seen = refused
            self._last_read = now
            if now < self.suspended_until:
                return 1e-9  # the bucket does not refill: every MAIL is refused
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        self._rate = value


# --------------------------------------------------------------------------
# The scenario


@dataclass(frozen=True, slots=True)
class Params:
    phase1: float  # seconds before the gmail-like limit is raised
    phase2: float  # seconds after
    settle: float  # seconds of phase 1 not counted in the steady-state figures
    gmail_connections: int
    gmail_rate: float
    gmail_raised: float
    grey_count: int
    grey_delay: float  # the sink's greylisting time
    grey_retry: float  # the engine's retry_max, so the greylisted retry comes after grey_delay
    yahoo_rate: float
    yahoo_burst: float
    yahoo_suspend: float  # the sink's suspension after a burst
    tss_suspend: float  # the engine's suspension on TSS04 (a classification rule)
    free_count: int
    static_connections: int
    static_gmail_rate: float
    static_yahoo_rate: float


@dataclass
class World:
    """One engine (adaptive or static) with its own sinks and source address."""

    name: str
    octet: int  # sinks on 127.0.<octet>.1-4, the engine's source on 127.0.<octet>.100
    adaptive: bool
    sinks: dict[str, SinkServer] = field(default_factory=dict)
    address: dict[str, str] = field(default_factory=dict)  # site key -> "ip:port" (also the engine's site name)
    limits: dict[str, LiveRateLimit] = field(default_factory=dict)
    engine: Engine | None = None
    outcomes: list[tuple[float, str, str, int, str | None]] = field(default_factory=list)  # t, site, status, attempts, category
    samples: list[dict[str, Any]] = field(default_factory=list)
    snapshots: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # moment -> site -> faults/messages
    submitted: dict[str, int] = field(default_factory=dict)
    events: list[ThrottleEvent] = field(default_factory=list)  # every one (the engine keeps the last 200)


async def start_sinks(world: World, p: Params, clock: Callable[[], float]) -> None:
    host = f"127.0.{world.octet}"
    specs: dict[str, tuple[int, str]] = {"gmail": (1, "gmail"), "grey": (2, "default"), "yahoo": (3, "yahoo"), "free": (4, "default")}
    for site, (last, profile) in specs.items():
        faults = FaultConfig()
        if site == "gmail":
            limit = LiveRateLimit(p.gmail_rate, p.gmail_rate, clock=clock)
            world.limits[site] = limit
            faults = FaultConfig(max_connections_per_ip=p.gmail_connections, rate_limit=cast(RateLimit, limit))
        elif site == "grey":
            faults = FaultConfig(greylist=True, greylist_seconds=p.grey_delay)
        elif site == "yahoo":
            limit = LiveRateLimit(p.yahoo_rate, p.yahoo_burst, suspend=p.yahoo_suspend, clock=clock)
            world.limits[site] = limit
            faults = FaultConfig(rate_limit=cast(RateLimit, limit))
        server = SinkServer(
            SinkConfig(listeners=(ListenerConfig(f"{host}.{last}", 0, profile=profile, faults=faults),), starttls=False)
        )
        if site == "yahoo":
            world.limits[site].stats = server.stats  # the suspension watches this sink's refusals
        (h, port), *_ = await server.start()
        world.sinks[site] = server
        world.address[site] = f"{h}:{port}"


def engine_config(world: World, p: Params) -> Config:
    def site(adaptive: dict[str, Any] | None, static: dict[str, Any]) -> dict[str, Any]:
        base: dict[str, Any] = {"idle_timeout": 5.0, "max_messages_per_connection": 100}
        if world.adaptive:
            return {**base, "max_connections": p.static_connections, "adaptive": adaptive or {}}
        return {**base, "max_connections": p.static_connections, **static, "adaptive": {"enabled": False}}

    sites = {
        # Adaptive: the same ceilings as the static baseline (above the receiver's),
        # the provider-table starting point for a Gmail-like site, defaults elsewhere.
        world.address["gmail"]: site({"initial_connections": 2, "initial_rate": 5.0}, {"rate": [f"{p.static_gmail_rate:g}/s"]}),
        world.address["grey"]: site(None, {}),
        world.address["yahoo"]: site({"initial_connections": 1, "initial_rate": 2.0}, {"rate": [f"{p.static_yahoo_rate:g}/s"]}),
        world.address["free"]: site(None, {}),
    }
    return config_from_dict(
        {
            "sources": [{"name": world.name, "address": f"127.0.{world.octet}.100"}],
            "routing": {"static": {f"{s}.test": [world.address[s]] for s in SITES}},
            "smtp": {"tls": "never", "timeouts": {"connect": 10, "greeting": 10, "mail": 10, "rcpt": 10, "data": 10}},
            "queue": {
                # Hints (greylisting 420 s, rate limits 600 s, policy 1800 s) are floors
                # capped by retry_max; the run is short, so is retry_max.
                "retry_initial": 1.0, "retry_max": p.grey_retry, "retry_jitter": 0.1, "max_lifetime": 3600,
            },
            "sites": sites,
        }
    )  # fmt: skip


def classifier(p: Params) -> Classifier:
    # The built-in TSS04 rule suspends for 30 minutes; the run lasts one or two,
    # so the operator's override of that rule shortens it (same matchers).
    return Classifier.from_rules(
        {"rule": [{"name": "yahoo-tss-suspend", "text": [r"\bTSS0[4-8]\b"], "category": "reputation_block",
                   "suspend": p.tss_suspend}]}
    )  # fmt: skip


def site_of(world: World, site_name: str | None) -> str:
    for key, address in world.address.items():
        if address == site_name:
            return key
    return "?"


async def run_world(world: World, p: Params, t0: float, raised: asyncio.Event) -> None:
    """Submit the scenario's mail, record outcomes and dials until the run ends."""
    loop = asyncio.get_running_loop()
    assert world.engine is not None
    engine = world.engine
    counts = {
        # Enough backlog that the limited sites never run dry (the figures are
        # fractions of what the receiver allows, so demand must exceed it).
        "gmail": int((p.gmail_rate * p.phase1 + p.gmail_raised * p.phase2) * 1.3) + 50,
        "grey": p.grey_count,
        "yahoo": int(p.yahoo_rate * (p.phase1 + p.phase2) * 1.3) + 20,
        "free": p.free_count,
    }
    world.submitted = counts

    async def record() -> None:
        async for o in engine.outcomes():
            if o.status is not Status.DEFERRED:
                world.outcomes.append((loop.time() - t0, site_of(world, o.site), o.status.value, o.attempts, o.category))

    async def sample() -> None:
        end = p.phase1 + p.phase2
        while loop.time() - t0 < end + SAMPLE_EVERY:
            now = loop.time()
            conns = {q["site"]: q["connections"] for q in engine.queue_stats()}
            for th in engine.throttles:
                st = th.status(now)
                world.samples.append({
                    "t": round(now - t0, 3), "site": site_of(world, th.site), "window": st.window, "rate": st.rate,
                    "good_rate": th.good_rate, "suspended": st.suspended_until is not None, "probing": st.probing,
                    "connections": conns.get(th.site, 0),
                })  # fmt: skip
            await asyncio.sleep(SAMPLE_EVERY)

    recorder = asyncio.ensure_future(record())
    sampler = asyncio.ensure_future(sample())
    await asyncio.sleep(0)  # let the recorder subscribe before the first outcome
    # Interleave the sites' submissions so no site's mail waits behind another's.
    order = [(s, i) for i in range(max(counts.values())) for s in SITES if i < counts[s]]
    for s, i in order:
        await engine.submit(MESSAGE, SENDER, [f"r{i}@{s}.test"])
    await raised.wait()
    world.snapshots["raise"] = snapshot(world)
    await sampler
    world.snapshots["end"] = snapshot(world)
    await engine.close(timeout=3)
    recorder.cancel()


def snapshot(world: World) -> dict[str, dict[str, int]]:
    return {
        s: {"throttle_replies": sum(srv.stats.faults[k] for k in THROTTLE_FAULTS), "messages": srv.stats.messages,
            "greylisted": srv.stats.faults["greylist"]}
        for s, srv in world.sinks.items()
    }  # fmt: skip


async def scenario(p: Params) -> list[World]:
    loop = asyncio.get_running_loop()
    worlds = [World("adaptive", 1, True), World("static", 2, False)]
    for w in worlds:
        await start_sinks(w, p, loop.time)
        engine = w.engine = Engine(engine_config(w, p), classifier=classifier(p))
        # Keep every throttle event: wrap the engine's hook (read when each site's throttle is made).
        forward = engine.throttles.on_event

        def keep(event: ThrottleEvent, events: list[ThrottleEvent] = w.events, forward: Any = forward) -> None:
            events.append(event)
            if forward is not None:
                forward(event)

        engine.throttles.on_event = keep
        await w.engine.start()
    raised = asyncio.Event()
    t0 = loop.time()
    tasks = [asyncio.ensure_future(run_world(w, p, t0, raised)) for w in worlds]

    async def settle_snapshot() -> None:
        await asyncio.sleep(p.settle)
        for w in worlds:
            w.snapshots["settle"] = snapshot(w)

    async def raise_limit() -> None:
        await asyncio.sleep(p.phase1)
        for w in worlds:
            w.limits["gmail"].rate = p.gmail_raised
            w.limits["gmail"].burst = p.gmail_raised
        raised.set()

    helpers = [asyncio.ensure_future(settle_snapshot()), asyncio.ensure_future(raise_limit())]
    try:
        # Bounded: the worlds end after phase1 + phase2 by themselves; this is the backstop.
        await asyncio.wait_for(asyncio.gather(*tasks), p.phase1 + p.phase2 + 60)
    finally:
        for t in (*tasks, *helpers):
            t.cancel()
        for w in worlds:
            if w.engine is not None:
                await w.engine.close(timeout=1)
            for srv in w.sinks.values():
                await srv.close()
    return worlds


# --------------------------------------------------------------------------
# Figures


def delivered_times(world: World, site: str) -> list[float]:
    return sorted(t for t, s, status, _, _ in world.outcomes if s == site and status == Status.DELIVERED.value)


def count_in(times: list[float], a: float, b: float) -> int:
    return sum(1 for t in times if a <= t < b)


def converge_time(times: list[float], cap: float, start: float, end: float, window: float = 2.0) -> float | None:
    """First t (from *start*) after which every *window*-second goodput up to *end* is ≥ 90% of *cap*."""
    points = [start + window + 0.5 * k for k in range(int((end - start - window) / 0.5) + 1)]
    ok = [count_in(times, t - window, t) / window >= 0.9 * cap for t in points]
    for i in range(len(points)):
        if all(ok[i:]):
            return points[i] - window - start
    return None


def reach_time(times: list[float], cap: float, start: float, end: float, window: float = 2.0) -> float | None:
    """Seconds after *start* until a *window*-second goodput first reaches 80% of *cap* (window end)."""
    t = start + window
    while t <= end + 1e-9:
        if count_in(times, t - window, t) / window >= 0.8 * cap:
            return t - start
        t += 0.25
    return None


@dataclass
class SiteFigures:
    world: str
    site: str
    submitted: int
    delivered: int
    capacity: float | None  # messages/s the sink allows (phase 1)
    goodput_steady: float | None  # messages/s from settle to the raise
    goodput_fraction: float | None
    throttle_per_1000_steady: float | None
    throttle_per_1000_run: float | None
    converge_s: float | None
    new_capacity: float | None
    reach_new_s: float | None
    finished_s: float | None  # when the last submitted message was delivered (None: not all)
    first_retry: str | None  # greylisting: "delivered on 2nd attempt / all"
    suspensions: int | None
    cuts: int


def figures(world: World, p: Params) -> list[SiteFigures]:
    out: list[SiteFigures] = []
    end = p.phase1 + p.phase2
    snap = world.snapshots
    for site in SITES:
        times = delivered_times(world, site)
        cap = {"gmail": p.gmail_rate, "yahoo": p.yahoo_rate}.get(site)
        steady_n = count_in(times, p.settle, p.phase1)
        steady = steady_n / (p.phase1 - p.settle)
        thr_steady = None
        if "settle" in snap and "raise" in snap:
            replies = snap["raise"][site]["throttle_replies"] - snap["settle"][site]["throttle_replies"]
            thr_steady = 1000 * replies / steady_n if steady_n else None
        total_delivered = len(times)
        thr_run = 1000 * snap["end"][site]["throttle_replies"] / total_delivered if total_delivered else None
        grey = None
        if site == "grey":
            done = [a for _, s, st, a, _ in world.outcomes if s == site and st == Status.DELIVERED.value]
            grey = f"{sum(1 for a in done if a == 2)}/{world.submitted[site]}"
        finished = times[-1] if len(times) >= world.submitted[site] else None
        cuts = sum(
            1 for e in world.events
            if site_of(world, e.site) == site and e.reason.startswith("throttled:")
            and e.kind in (EventKind.RATE, EventKind.WINDOW)
        )  # fmt: skip
        suspensions = len(world.limits[site].suspensions) if site == "yahoo" else None
        out.append(SiteFigures(
            world.name, site, world.submitted[site], total_delivered, cap,
            steady if cap else None, steady / cap if cap else None,
            thr_steady if cap else None, thr_run,
            converge_time(times, cap, 0.0, p.phase1) if site == "gmail" and cap else None,
            p.gmail_raised if site == "gmail" else None,
            reach_time(times, p.gmail_raised, p.phase1, end) if site == "gmail" else None,
            finished, grey, suspensions, cuts,
        ))  # fmt: skip
    return out


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def checks(figs: list[SiteFigures], p: Params) -> list[Check]:
    f = {(x.world, x.site): x for x in figs}
    ag, sg = f["adaptive", "gmail"], f["static", "gmail"]
    out = []
    frac, per = ag.goodput_fraction or 0.0, ag.throttle_per_1000_steady
    out.append(Check(
        "gmail-like goodput >= 90% of allowed, <= 5 throttle replies / 1000 delivered (steady state)",
        frac >= 0.9 and per is not None and per <= 5,
        f"adaptive {frac:.0%} of {p.gmail_rate:g}/s, {_f(per, '.1f')} per 1000",
    ))  # fmt: skip
    storm = sg.throttle_per_1000_steady
    out.append(Check(
        "static baseline shows the deferral storm (>= 100 throttle replies / 1000 delivered)",
        storm is not None and storm >= 100,
        f"static {_f(storm, '.0f')} per 1000, goodput {_f(sg.goodput_fraction, '.0%')}",
    ))  # fmt: skip
    reach = ag.reach_new_s
    out.append(Check(
        f"after the raise to {p.gmail_raised:g}/s: >= 80% of it within 60 s",
        reach is not None and reach <= 60,
        f"reached after {_f(reach, '.1f')} s" + ("" if reach is not None else f" (not within the {p.phase2:g} s of phase 2)"),
    ))  # fmt: skip
    ggrey = f["adaptive", "grey"]
    out.append(Check(
        "greylisted recipients delivered on their first retry",
        ggrey.first_retry == f"{p.grey_count}/{p.grey_count}",
        f"{ggrey.first_retry} delivered on attempt 2",
    ))  # fmt: skip
    free = f["adaptive", "free"]
    out.append(Check(
        "no site starves another: the unlimited site finished while the gmail-like site was still pacing",
        free.finished_s is not None and free.finished_s < p.phase1 and frac >= 0.8,
        f"unlimited done at {_f(free.finished_s, '.1f')} s; gmail-like at {frac:.0%} of its capacity meanwhile",
    ))  # fmt: skip
    return out


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(figs: list[SiteFigures]) -> str:
    head = ["world/site", "submitted", "delivered", "allowed/s", "steady/s", "of allowed", "thr/1000 st",
            "thr/1000 run", "converge s", "new cap/s", "reach s", "done at s", "grey 1st retry", "susp", "cuts"]  # fmt: skip
    rows = [
        [f"{x.world}/{x.site}", str(x.submitted), str(x.delivered), _f(x.capacity, "g"), _f(x.goodput_steady, ".1f"),
         _f(x.goodput_fraction, ".0%"), _f(x.throttle_per_1000_steady, ".1f"), _f(x.throttle_per_1000_run, ".1f"),
         _f(x.converge_s, ".1f"), _f(x.new_capacity, "g"), _f(x.reach_new_s, ".1f"), _f(x.finished_s, ".1f"),
         x.first_retry or "-", "-" if x.suspensions is None else str(x.suspensions), str(x.cuts)]
        for x in figs
    ]  # fmt: skip
    return text_table(head, rows)


def plot(worlds: list[World], p: Params, path: Path) -> str | None:
    """Window, adaptive rate and delivered/s over time, per site (rows) and world (columns)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    end = p.phase1 + p.phase2
    fig, axes = plt.subplots(len(SITES), len(worlds), figsize=(7 * len(worlds), 2.6 * len(SITES)), squeeze=False)
    for col, w in enumerate(worlds):
        for row, site in enumerate(SITES):
            ax = axes[row][col]
            times = delivered_times(w, site)
            bins = list(range(int(end) + 1))
            ax.step(bins, [count_in(times, k - 1, k) for k in bins], where="pre", color="tab:green", lw=1, label="delivered/s")
            samples = [s for s in w.samples if s["site"] == site]
            ts = [s["t"] for s in samples]
            if any(s["rate"] is not None for s in samples):
                ax.plot(ts, [s["rate"] if s["rate"] is not None else float("nan") for s in samples], color="tab:blue",
                        lw=1.2, label="rate dial (msg/s)")  # fmt: skip
            cap = {"gmail": p.gmail_rate, "yahoo": p.yahoo_rate}.get(site)
            if cap:
                capx = [0, p.phase1, p.phase1, end] if site == "gmail" else [0, end]
                capy = [cap, cap, p.gmail_raised, p.gmail_raised] if site == "gmail" else [cap, cap]
                ax.plot(capx, capy, color="black", ls="--", lw=0.8, label="allowed/s")
            for s in samples:
                if s["suspended"]:
                    ax.axvspan(s["t"] - SAMPLE_EVERY, s["t"], color="tab:red", alpha=0.15, lw=0)
            ax.axvline(p.phase1, color="grey", lw=0.6)
            ax.set_ylabel("msg/s")
            top = max([cap * 2.5 if cap else 0, *(count_in(times, k - 1, k) for k in bins), 1])
            ax.set_ylim(0, top * 1.1)
            ax2 = ax.twinx()
            ax2.step(ts, [s["window"] for s in samples], where="post", color="tab:orange", lw=1, label="window")
            ax2.step(ts, [s["connections"] for s in samples], where="post", color="tab:purple", lw=0.8, ls=":",
                     label="open connections")  # fmt: skip
            ax2.set_ylim(0, max(p.static_connections, 5) + 1)
            ax2.set_ylabel("connections")
            ax.set_title(f"{w.name}: {site}", fontsize=10)
            if row == len(SITES) - 1:
                ax.set_xlabel("seconds (grey line: gmail-like limit raised; red: suspended)")
            if row == 0 and col == 0:
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = ax2.get_legend_handles_labels()
                ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short phases (25 s + 35 s): checks that it works, < 2 min")
    ap.add_argument("--phase1", type=float, help="seconds before the gmail-like limit is raised (default 90; quick 25)")
    ap.add_argument("--phase2", type=float, help="seconds after the raise (default 90; quick 35)")
    ap.add_argument("--settle", type=float, help="seconds of phase 1 left out of steady-state figures (default 20; quick 8)")
    ap.add_argument("--gmail-rate", type=float, default=20.0, help="gmail-like messages/s per client IP (default 20)")
    ap.add_argument("--gmail-raised", type=float, default=40.0, help="... after the raise (default 40)")
    ap.add_argument("--gmail-connections", type=int, default=5, help="gmail-like connections per client IP (default 5)")
    ap.add_argument("--yahoo-rate", type=float, default=10.0, help="suspending site's messages/s (default 10)")
    ap.add_argument("--yahoo-burst", type=float, default=5.0, help="its burst (default 5)")
    ap.add_argument("--yahoo-suspend", type=float, default=3.0, help="the sink's suspension after a burst, s (default 3)")
    ap.add_argument("--tss-suspend", type=float, default=5.0, help="the engine's suspension on TSS04, s (default 5)")
    ap.add_argument("--grey-count", type=int, default=50, help="greylisted recipients (default 50)")
    ap.add_argument("--grey-delay", type=float, default=2.0, help="the sink's greylisting time, s (default 2)")
    ap.add_argument("--free-count", type=int, help="messages to the unlimited site (default 5000; quick 2000)")
    ap.add_argument("--static-connections", type=int, default=10, help="static baseline's connections (default 10)")
    ap.add_argument("--json", type=Path, help="write figures, checks, time series and events here")
    ap.add_argument("--plot", type=Path, default=Path("throttle.png"), help="PNG plot path (default ./throttle.png)")
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def params(args: argparse.Namespace) -> Params:
    q = args.quick
    phase1 = args.phase1 or (25.0 if q else 90.0)
    phase2 = args.phase2 or (35.0 if q else 90.0)
    settle = args.settle if args.settle is not None else (8.0 if q else 20.0)
    if not 0 <= settle < phase1:
        raise SystemExit("--settle must lie within phase 1")
    return Params(
        phase1=phase1, phase2=phase2, settle=settle, gmail_connections=args.gmail_connections,
        gmail_rate=args.gmail_rate, gmail_raised=args.gmail_raised, grey_count=args.grey_count,
        grey_delay=args.grey_delay, grey_retry=args.grey_delay + 1.0, yahoo_rate=args.yahoo_rate,
        yahoo_burst=args.yahoo_burst, yahoo_suspend=args.yahoo_suspend, tss_suspend=args.tss_suspend,
        free_count=args.free_count or (2000 if q else 5000), static_connections=args.static_connections,
        # "Fixed limits above the receiver's": twice the allowed rates.
        static_gmail_rate=2 * args.gmail_rate, static_yahoo_rate=2 * args.yahoo_rate,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    p = params(args)
    print(f"phases {p.phase1:g} s + {p.phase2:g} s (settle {p.settle:g} s); adaptive and static run side by side",
          flush=True)  # fmt: skip
    started = time.time()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        worlds = runner.run(scenario(p))
    figs = [x for w in worlds for x in figures(w, p)]
    print(table(figs))
    results = checks(figs, p)
    print()
    for c in results:
        print(f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}")
    events = {
        w.name: [
            {"at": round(e.at, 3), "site": site_of(w, e.site), "kind": str(e.kind), "old": e.old, "new": e.new,
             "reason": e.reason[:160]}
            for e in w.events
        ]
        for w in worlds
    }  # fmt: skip
    note = None if args.no_plot else plot(worlds, p, args.plot)
    if note:
        print(note)
    elif not args.no_plot:
        print(f"plot: {args.plot}")
    if args.json:
        doc = {
            "params": asdict(p), "quick": args.quick, "started": started, "wall_s": round(time.time() - started, 1),
            "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                        "loadavg": os.getloadavg()},
            "sites": [asdict(x) for x in figs], "checks": [asdict(c) for c in results],
            "sink_snapshots": {w.name: w.snapshots for w in worlds},
            "samples": {w.name: w.samples for w in worlds}, "events": events,
        }  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"json: {args.json}")
    return 0 if all(c.passed for c in results) else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
