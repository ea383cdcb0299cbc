#!/usr/bin/env python3
"""A cluster of ``fastmta serve`` nodes sharing a rate limit through Redis (issue 17's benchmark).

Everything on loopback, on this machine: one ``redis-server`` (tests/redisproc.py: a free port, proved
ours by its PID, no persistence), one Postfix ``smtp-sink`` that counts (bench_serve's), and 1, 2 or 3
``fastmta serve`` nodes, each with its own data directory, delivering from its own source address
(``[[sources]] address = "127.0.0.2"``, .3, .4) and sharing one ``[cluster]`` limit of scope ``site``
(every node's traffic to the sink is one key, so the nodes contend for it)::

    smtp-source (20 sessions in all, split over the nodes) --SMTP--> node i --SMTP from 127.0.0.(i+2)--> smtp-sink
                                                                     node i <--GCRA script--> redis-server

Three cases, each with 1, 2 and 3 nodes, from scratch every run (new data directories, new sink, a new
key prefix in the same Redis):

* ``off``: no ``[cluster]`` at all (the baseline: what the nodes do without Redis);
* ``open``: the shared limit is set far above what the machine can do (``--open-rate``, default
  20,000/s): it never binds, so the figures are the cluster's aggregate msgs/s against an unlimited sink
  and the Redis round trips the limiter costs per delivered message while it is consulted on every
  delivery;
* ``bound``: the shared limit R (``--rate``, default 500/s) binds; the aggregate rate at the sink in
  steady state (from 10 % to 90 % of the messages, so the initial burst is left out) must be within 5 %
  of R, whatever the number of nodes.

Measured per run, from outside the nodes (``fastmta serve`` does not export ``Cluster.round_trips``):

* msgs/s = N / (time the N-th message reached the sink - time the injection started); steady msgs/s:
  the least-squares slope of the sink's counter (polled every 20 ms) from the 10 % message (or, if
  later, three times the limit's burst: the burst is not the rate) to the 90 % message;
* limiter round trips / message: the GCRA script calls (``EVALSHA`` + ``EVAL`` in Redis's
  ``INFO commandstats``) during the run, / N: one call is one round trip of one node;
* Redis writes / message: Redis's ``total_writes_processed`` (reply writes: one per request or
  pipeline, more for a pipeline that arrives in several reads, so at least the round trips) during the
  run, / N: the limiter plus the accounting-record stream every node writes to Redis (batched XADDs,
  one pipeline per 50 ms while there are records);
* CPU µs / message of the nodes' process trees (bench_serve's ``tree_cpu``) and of redis-server;
* per node, the recipients its accounting log says it delivered (the shares).

Medians over ``--runs`` runs (default 3). Checks: limiter round trips per message <= 0.05 (the goal) in
every configuration; bound aggregate within 5 % of R. Exit status: 0 every run completed and every check
passed, 1 a run failed (crash, timeout, a message missing or delivered twice), 2 a check failed.

Usage:
  python bench/bench_cluster.py --json bench/cluster-results.json   # the measurement (a quiet machine)
  python bench/bench_cluster.py --quick                             # a smoke test: small N, 1 run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))
from _util import proc_cpu_seconds, text_table  # noqa: E402
from bench_serve import (  # noqa: E402
    SENDER,
    SESSIONS,
    SIZE,
    AccountingCounter,
    CountingSink,
    Injection,
    _fmt,
    _median,
    counting_sink,
    plan_lanes,
    tree_cpu,
)
from redisproc import RedisProc, have_redis, redis_server  # noqa: E402
from serveproc import Served, start_serve, stop_serve  # noqa: E402

SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
NODES = (1, 2, 3)
OFF, OPEN, BOUND = "off", "open", "bound"
GOAL_TRIPS = 0.05  # limiter round trips per delivered message
GOAL_RATE_TOLERANCE = 0.05  # bound: aggregate within 5 % of R


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Redis's own counters
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisCounters:
    script_calls: int  # EVALSHA + EVAL: the GCRA (and lease) scripts
    writes: int  # total_writes_processed: reply writes, about one per round trip
    commands: int
    cpu_s: float


def redis_counters(client: Any, pid: int) -> RedisCounters:
    stats, cmds = client.info("stats"), client.info("commandstats")
    calls = sum(int(cmds.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))
    return RedisCounters(calls, int(stats["total_writes_processed"]), int(stats["total_commands_processed"]),
                         proc_cpu_seconds(pid))


# --------------------------------------------------------------------------
# The nodes
# --------------------------------------------------------------------------


def node_config(data_dir: Path, sink: tuple[str, int], redis_url: str | None, *, node: str, source: str, prefix: str,
                rate: float, batch: float, nodes: int) -> str:  # fmt: skip
    """A node's configuration; *redis_url* None: no [cluster] (the ``off`` case)."""
    cluster = [
        "[cluster]", f'redis = "{redis_url}"', f'node = "{node}"', f'prefix = "{prefix}"', f"batch = {batch:g}",
        f"nodes_hint = {nodes}", "",
        "[[cluster.limit]]", 'scope = "site"', 'match = "*"', f'rate = "{rate:g}/s"', "",
    ] if redis_url is not None else []  # fmt: skip
    return "\n".join([
        "[routing.static]", f'"*" = ["{sink[0]}:{sink[1]}"]', "",
        "[smtp]", 'tls = "never"', "",
        '[sites."*".adaptive]', "enabled = false", "",
        "[[sources]]", f'name = "{node}"', f'address = "{source}"', f'ehlo_name = "{node}.bench.example"', "",
        *cluster,
        "[serve]", f'hostname = "{node}.bench.example"', f'data_dir = "{data_dir}"', "",
        "[[serve.smtp]]", 'listen = "127.0.0.1:0"', "",
    ])  # fmt: skip


class SplitInjection(Injection):
    """bench_serve's injection (smtp-source lanes, 100 domains) with *sessions* lanes instead of 20, so
    that the cluster as a whole gets 20 sessions whatever the number of nodes."""

    def __init__(self, target: str, message_file: Path, n: int, sessions: int) -> None:
        super().__init__(target, message_file, n)
        self.lanes = plan_lanes(n, sessions=sessions)
        self._threads = [threading.Thread(target=self._lane, args=(lane,), daemon=True) for lane in self.lanes]


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


@dataclass
class Run:
    case: str
    nodes: int
    round: int
    n: int
    rate_limit: float
    ok: bool = False
    failure: str = ""
    wall_s: float | None = None  # injection started -> N-th message at the sink
    msgs_per_s: float | None = None
    steady_msgs_per_s: float | None = None  # between the 10 % and the 90 % message at the sink
    limiter_trips: int | None = None
    limiter_trips_per_msg: float | None = None
    redis_writes: int | None = None
    redis_writes_per_msg: float | None = None
    redis_commands: int | None = None
    nodes_cpu_us_per_msg: float | None = None
    redis_cpu_us_per_msg: float | None = None
    delivered_by_node: list[int] = field(default_factory=list)
    sink_count: int | None = None
    keys: list[str] = field(default_factory=list)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (s, messages at the sink), every 0.5 s


def _wait(pred: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def _slope(samples: list[tuple[float, int]], lo: float, hi: float) -> float | None:
    """Messages per second: least-squares slope of the sink's counter over the samples from count *lo* to *hi*.

    Deliveries under a shared limit come in batches (a node spends a batch as soon as it is due), so the
    counter is a staircase; a slope over every sample is not thrown off, as a two-point rate is, by where
    the first and last points fall on a step.
    """
    pts = [(t, c) for t, c in samples if lo <= c <= hi]
    if len(pts) < 3 or pts[-1][0] - pts[0][0] <= 0:
        return None
    mt = sum(t for t, _ in pts) / len(pts)
    mc = sum(c for _, c in pts) / len(pts)
    var = sum((t - mt) ** 2 for t, _ in pts)
    return sum((t - mt) * (c - mc) for t, c in pts) / var if var > 0 else None


def _deliver(run: Run, nodes: list[Served], counters: list[AccountingCounter], shares: list[int], sink: CountingSink,
             message_file: Path, timeout: float, burst: int, halfway: Callable[[], None]) -> None:  # fmt: skip
    """Inject every node's share, follow the sink's counter to N (calling *halfway* once at N/2), wait until
    every node is idle."""
    n = run.n
    sessions = max(1, SESSIONS // len(nodes))
    injections = [SplitInjection("{}:{}".format(*s.smtp), message_file, k, sessions) for s, k in zip(nodes, shares)]
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    for inj in injections:
        inj.start()
    deadline = t0 + timeout
    try:
        while True:
            seen = sink.count()
            now = time.perf_counter()
            samples.append((now - t0, seen))
            if seen >= n / 2 and not run.keys:
                halfway()
            if seen >= n:
                run.wall_s = now - t0
                break
            for inj in injections:
                inj.done()
            failed = [f for inj in injections for f in inj.failures]
            if failed:
                run.failure = failed[0]
                return
            if now > deadline:
                run.failure = f"timeout after {timeout:g} s: {seen} of {n} messages at the sink"
                return
            time.sleep(0.02)
        if not _wait(lambda: all(inj.done() for inj in injections), 30):
            run.failure = "smtp-source still running after the sink had every message"
            return
    finally:
        for inj in injections:
            inj.stop()
    run.msgs_per_s = n / run.wall_s
    run.timeline = [(round(t, 3), c) for i, (t, c) in enumerate(samples) if i % 25 == 0] + [samples[-1]]
    # From 10 % (or past three times the limit's burst, when that is in the first half) to 90 %: the burst
    # granted at the start is spent as the injection ramps up, so the first messages are not the rate.
    start = max(0.1 * n, 3.0 * burst) if 3.0 * burst < 0.5 * n else 0.1 * n
    run.steady_msgs_per_s = _slope(samples, start, 0.9 * n)
    if not _wait(lambda: all(c() >= k for c, k in zip(counters, shares)), 60, 0.1):
        run.failure = "a node did not record every delivery within 60 s of the last one"
        return
    time.sleep(0.3)  # the records' stream flushes (50 ms); a duplicate delivery would show at the sink
    run.delivered_by_node = [c() for c in counters]
    run.sink_count = sink.count()
    if run.sink_count != n or sum(run.delivered_by_node) != n:
        run.failure = f"the sink got {run.sink_count}, the nodes report {sum(run.delivered_by_node)}, of {n}"
        return
    run.ok = True


def one_run(case: str, k: int, rnd: int, n: int, rate: float, args: argparse.Namespace, redis: RedisProc,
            rclient: Any, workdir: Path, message_file: Path) -> Run:  # fmt: skip
    run = Run(case, k, rnd, n, rate)
    rundir = Path(tempfile.mkdtemp(prefix=f"{case[0]}{k}r{rnd}-", dir=workdir))
    prefix = f"bench:{rundir.name}:"
    nodes: list[Served] = []
    with counting_sink(rundir) as sink:
        try:
            for i in range(k):
                data = rundir / f"n{i + 1}"
                data.mkdir()
                cfg = rundir / f"n{i + 1}.toml"
                url = redis.url if case != OFF else None
                cfg.write_text(node_config(data, sink.address, url, node=f"n{i + 1}", source=SOURCES[i],
                                           prefix=prefix, rate=rate, batch=args.batch, nodes=k))  # fmt: skip
                nodes.append(start_serve(cfg, data, timeout=60))
            counters = [AccountingCounter(s.data_dir / "accounting.jsonl") for s in nodes]
            shares = [n // k + (1 if i < n % k else 0) for i in range(k)]
            before = redis_counters(rclient, redis.pid)
            cpu0 = [tree_cpu(s.proc.pid).total_s for s in nodes]
            timeout = args.run_timeout + (n / rate if case == BOUND else 0.0)
            burst = math.ceil(rate * args.batch) * k  # the default burst: a batch per node (nodes_hint = k)
            def halfway() -> None:  # the limit's keys, while they exist (they expire a second after use)
                run.keys = sorted(key.decode() for key in rclient.scan_iter(match=f"{prefix}gcra:*", count=1000))
                run.keys = run.keys or ["(none)"]

            _deliver(run, nodes, counters, shares, sink, message_file, timeout, burst, halfway)
            if run.ok:
                cpu1 = [tree_cpu(s.proc.pid).total_s for s in nodes]
                after = redis_counters(rclient, redis.pid)
                run.limiter_trips = after.script_calls - before.script_calls
                run.redis_writes = after.writes - before.writes - 2  # less the replies to our first two INFOs
                run.redis_commands = after.commands - before.commands - 2
                run.limiter_trips_per_msg = run.limiter_trips / n
                run.redis_writes_per_msg = run.redis_writes / n
                run.nodes_cpu_us_per_msg = (sum(cpu1) - sum(cpu0)) / n * 1e6
                run.redis_cpu_us_per_msg = (after.cpu_s - before.cpu_s) / n * 1e6
        finally:
            for s in nodes:
                rc = stop_serve(s)
                if rc not in (0, None) and run.ok:
                    run.ok, run.failure = False, f"fastmta serve exited with {rc}"
    if not run.ok:
        for i in range(len(nodes)):
            log = rundir / f"n{i + 1}-serve.log"
            if log.exists():
                _log(f"  node n{i + 1} log tail:\n{log.read_text(errors='replace')[-1500:]}")
    return run


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


@dataclass
class Summary:
    case: str
    nodes: int
    rate_limit: float
    runs: int
    ok_runs: int
    msgs_per_s: float | None
    steady_msgs_per_s: float | None
    limiter_trips_per_msg: float | None
    redis_writes_per_msg: float | None
    nodes_cpu_us_per_msg: float | None
    redis_cpu_us_per_msg: float | None
    shares: list[float] = field(default_factory=list)  # median share of each node, in %


def summarize(runs: list[Run], case: str, k: int) -> Summary:
    mine = [r for r in runs if r.case == case and r.nodes == k]
    ok = [r for r in mine if r.ok]
    shares = [_median([r.delivered_by_node[i] / r.n * 100 for r in ok]) or 0.0 for i in range(k)] if ok else []
    return Summary(
        case, k, mine[0].rate_limit if mine else 0.0, len(mine), len(ok),
        _median([r.msgs_per_s for r in ok]), _median([r.steady_msgs_per_s for r in ok]),
        _median([r.limiter_trips_per_msg for r in ok]), _median([r.redis_writes_per_msg for r in ok]),
        _median([r.nodes_cpu_us_per_msg for r in ok]), _median([r.redis_cpu_us_per_msg for r in ok]), shares,
    )  # fmt: skip


@dataclass
class Check:
    name: str
    ok: bool | None
    detail: str


def checks(summaries: list[Summary], runs: list[Run]) -> list[Check]:
    out = []
    for s in summaries:
        if s.case == OFF:
            continue
        label = f"{s.case}, {s.nodes} node{'s' if s.nodes > 1 else ''}"
        worst = max((r.limiter_trips_per_msg for r in runs if r.ok and r.case == s.case and r.nodes == s.nodes
                     and r.limiter_trips_per_msg is not None), default=None)  # fmt: skip
        if worst is None:
            out.append(Check(f"{label}: limiter round trips/msg <= {GOAL_TRIPS}", None, "not measured"))
        else:
            out.append(Check(f"{label}: limiter round trips/msg <= {GOAL_TRIPS}", worst <= GOAL_TRIPS,
                             f"worst run {worst:.4f}, median {s.limiter_trips_per_msg:.4f}"))
        if s.case == BOUND:
            if s.steady_msgs_per_s is None:
                out.append(Check(f"{label}: aggregate within 5% of {s.rate_limit:g}/s", None, "not measured"))
            else:
                off = s.steady_msgs_per_s / s.rate_limit - 1
                out.append(Check(f"{label}: aggregate within 5% of {s.rate_limit:g}/s",
                                 abs(off) <= GOAL_RATE_TOLERANCE,
                                 f"{s.steady_msgs_per_s:,.1f} msgs/s steady ({off:+.1%})"))
    return out


def table(summaries: list[Summary]) -> str:
    head = ["case", "nodes", "limit/s", "msgs/s", "steady msgs/s", "limiter trips/msg", "redis writes/msg",
            "nodes CPU µs/msg", "redis µs/msg", "shares %", "ok runs"]  # fmt: skip
    rows = [[s.case, str(s.nodes), f"{s.rate_limit:,.0f}" if s.rate_limit else "-", _fmt(s.msgs_per_s, ",.0f"),
             _fmt(s.steady_msgs_per_s, ",.1f"), _fmt(s.limiter_trips_per_msg, ".4f"),
             _fmt(s.redis_writes_per_msg, ".4f"), _fmt(s.nodes_cpu_us_per_msg, ",.0f"),
             _fmt(s.redis_cpu_us_per_msg, ",.1f"), "/".join(f"{x:.0f}" for x in s.shares) or "-",
             f"{s.ok_runs}/{s.runs}"] for s in summaries]  # fmt: skip
    return text_table(head, rows)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--n", type=int, default=None, help="messages per open run (default 20000; --quick 2000)")
    p.add_argument("--bound-n", type=int, default=None,
                   help="messages per bound run (default: 20 s at --rate; --quick: 6 s)")
    p.add_argument("--runs", type=int, default=None, help="runs of each configuration (default 3; --quick 1)")
    p.add_argument("--nodes", type=int, nargs="+", default=list(NODES), choices=NODES, help="node counts (1 2 3)")
    p.add_argument("--cases", nargs="+", default=[OFF, OPEN, BOUND], choices=[OFF, OPEN, BOUND],
                   help="off (no [cluster]: the baseline), open, bound (default: all three)")
    p.add_argument("--rate", type=float, default=500.0, help="the binding shared limit R, msgs/s (default 500)")
    p.add_argument("--open-rate", type=float, default=20_000.0,
                   help="the shared limit of the open case: above what the machine does (default 20000)")
    p.add_argument("--batch", type=float, default=0.2, help="[cluster] batch, seconds (default 0.2)")
    p.add_argument("--quick", action="store_true", help="small N, 1 run: a smoke test, not a measurement")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds per run (default: 120 + N/50)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new directory under /tmp, removed after")
    p.add_argument("--keep", action="store_true", help="keep the work directory (data directories, logs)")
    p.add_argument("--json", type=Path, help="write medians, every run and the checks here")
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 2000 if args.quick else 20_000
    if args.bound_n is None:
        args.bound_n = round(args.rate * (6 if args.quick else 20))
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.run_timeout is None:
        args.run_timeout = 120 + args.n / 50
    if min(args.n, args.bound_n) < 100 * max(args.nodes):
        p.error("every node needs at least 100 messages (one per domain): raise --n / --bound-n")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import redis as redispy

    from fastmta.load.workload import make_message

    if not have_redis():
        _log("redis-server is not installed (Debian: apt-get install redis-server)")
        return 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bcl-", dir="/tmp"))  # short: admin socket paths
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    message_file = workdir / "message.txt"
    message_file.write_bytes(make_message(SIZE, SENDER, "rcpt@bench.example").replace(b"\r\n", b"\n"))
    message_file.chmod(0o644)
    plan = [(case, k) for case in args.cases for k in args.nodes]
    runs: list[Run] = []
    started = time.monotonic()
    load0 = os.getloadavg()
    _log(f"{len(plan)} configurations x {args.runs} run(s); open: {args.n:,} messages at a {args.open_rate:,.0f}/s "
         f"limit; bound: {args.bound_n:,} at {args.rate:g}/s; batch {args.batch:g} s; work dir {workdir}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with redis_server() as redis:
            rclient = redispy.Redis.from_url(redis.url, socket_timeout=10)
            try:
                for rnd in range(args.runs):
                    for case, k in plan if rnd % 2 == 0 else plan[::-1]:
                        n, rate = (args.bound_n, args.rate) if case == BOUND else (args.n, args.open_rate)
                        rate = 0.0 if case == OFF else rate
                        _log(f"round {rnd + 1}/{args.runs}: {case}, {k} node(s), {n:,} messages ...")
                        try:
                            run = one_run(case, k, rnd, n, rate, args, redis, rclient, workdir, message_file)
                        except Exception as exc:
                            run = Run(case, k, rnd, n, rate, failure=f"{type(exc).__name__}: {exc}")
                        runs.append(run)
                        _log(f"  {run.msgs_per_s or 0:,.0f} msgs/s (steady {run.steady_msgs_per_s or 0:,.1f}), "
                             f"limiter {run.limiter_trips} trips ({run.limiter_trips_per_msg or 0:.4f}/msg), "
                             f"redis writes {run.redis_writes_per_msg or 0:.4f}/msg, by node {run.delivered_by_node}"
                             if run.ok else f"  FAILED: {run.failure}")
            finally:
                rclient.close()
    except KeyboardInterrupt:
        _log("interrupted")
    elapsed = time.monotonic() - started

    summaries = [summarize(runs, case, k) for case, k in plan]
    result_checks = checks(summaries, runs)
    load = os.getloadavg()
    print(table(summaries))
    print()
    print(f"median of {args.runs} run(s); open: {args.n:,} messages of {SIZE} B, limit {args.open_rate:,.0f}/s "
          f"(never binds); bound: {args.bound_n:,} messages, limit {args.rate:g}/s; scope site (one key for all "
          f"nodes), batch {args.batch:g} s; {SESSIONS} injecting sessions in all; {elapsed:.0f} s total"
          + ("  [--quick: figures are indicative only]" if args.quick else ""))
    print(f"load average at the start {load0[0]:.2f}, at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"({os.cpu_count()} CPUs: smtp-source, the nodes, smtp-sink and redis-server share them)")
    counts = sorted({len([k for k in r.keys if k != "(none)"]) for r in runs if r.ok and r.case != OFF})
    example = next((r.keys[0].split(":", 2)[-1] for r in runs if r.keys and r.keys[0] != "(none)"), "")
    if counts:
        print(f"shared limit keys per run: {'/'.join(map(str, counts))} (e.g. {example}: every node's traffic)")
    print()
    print(f"Goals (issue 17): limiter round trips per delivered message <= {GOAL_TRIPS}; "
          "a binding shared limit holds the cluster's aggregate within 5%")
    verdicts = {True: "PASS", False: "FAIL", None: "SKIP"}
    for c in result_checks:
        print(f"  {verdicts[c.ok]}  {c.name}: {c.detail}")
    failed = [r for r in runs if not r.ok]
    if failed:
        print()
        print("Failed runs:")
        for (case, k, why), count in Counter((r.case, r.nodes, r.failure) for r in failed).items():
            print(f"  {case}, {k} node(s): {why}" + (f"  (x{count})" if count > 1 else ""))
    if args.json:
        doc = {
            "argv": [sys.executable, *sys.argv],
            "quick": args.quick,
            "n": args.n, "bound_n": args.bound_n, "runs": args.runs, "rate": args.rate,
            "open_rate": args.open_rate, "batch": args.batch, "message_bytes": SIZE, "sessions": SESSIONS,
            "elapsed_s": elapsed,
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "loadavg_at_start": load0, "loadavg_at_end": load},
            "method": ("msgs/s = N / (N-th message at smtp-sink - injection started); steady = least-squares "
                       "slope of the sink's counter from the 10% (or 3x burst) to the 90% message; limiter round trips = EVALSHA+EVAL calls in "
                       "redis INFO commandstats during the run; redis writes = total_writes_processed; "
                       "medians over runs"),
            "medians": [asdict(s) for s in summaries],
            "checks": [asdict(c) for c in result_checks],
            "results": [asdict(r) for r in runs],
        }  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    if not args.keep and args.workdir is None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    if failed or len(runs) < args.runs * len(plan):
        return 1
    return 2 if any(c.ok is False for c in result_checks) else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main(sys.argv[1:]))
