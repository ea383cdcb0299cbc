#!/usr/bin/env python3
"""SMTP throughput and CPU benchmark: fastmta load / sink against Postfix's tools and aiosmtplib.

All in one run, on loopback, interleaved so that a change in machine load
hits every configuration alike:

  client → server pairs
    fastmta load      → smtp-sink        fastmta load      → fastmta sink
    smtp-source       → smtp-sink        smtp-source       → fastmta sink
    aiosmtplib        → smtp-sink        (smtp-source stock → both sinks at >= 10 connections: the acceptance reference)
    fastmta load --workers 2 → smtp-sink (--workers N; only where connections >= N)
  × message sizes (2 KB, 20 KB) × connections (1, 10) × --runs rounds.

Reported per configuration (median over the rounds): messages/s, client CPU
µs per message, server CPU µs per message. Then the acceptance checks of
issue 2, item 3, and of issue 7, item 1, computed from those medians.

How things are measured (the same way for every client):
* Each client is a child process. Its CPU is the exact rusage of that child
  (``os.wait4``) and its wall time is spawn-to-exit as seen from here.
* Fixed costs are excluded by difference: every (client, server, connections)
  is also run with as many messages as connections (one message per
  connection), and the figures are the *marginal* cost of the remaining
  N - C messages: client CPU/msg = (cpu(N) - cpu(C)) / (N - C) and
  messages/s = (N - C) / (wall(N) - wall(C)), with cpu(C) and wall(C) the
  medians of the baseline runs. This removes interpreter start-up and
  imports (~0.2 s of CPU for a Python client, ~1 ms for smtp-source), which
  would otherwise dominate short runs and say nothing about steady-state
  delivery, plus connection setup and teardown, identically for all clients.
  fastmta load's own figures (``--json``) are kept in the JSON output as a
  cross-check.
* Server CPU/msg = (utime+stime of the server process over the client run,
  from /proc/PID/stat) / N. One smtp-sink and one fastmta sink serve the
  whole benchmark; both are idle between runs.

Usage:
  python bench/bench_smtp.py                      # full: 5 rounds, 20000 messages per run
  python bench/bench_smtp.py --quick              # smoke test: 3 rounds, 2000 messages, < 1 minute
  python bench/bench_smtp.py --runs 7 --json results.json

Exit status: 0 all runs complete and all checks pass, 1 some run failed,
2 all runs complete but an acceptance check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import ChildRun, Server, fastmta_sink, find_tool, postfix_smtp_sink, run_child

SENDER = "load@fastmta.test"
RECIPIENT = "rcpt@load.test"
HELO = "load.fastmta.test"

# Client kinds. "smtp-source" reuses its connections (-d); "smtp-source-stock"
# is its default of one message per session (connect, HELO, one message, QUIT).
FASTMTA_LOAD = "fastmta load"
SMTP_SOURCE = "smtp-source"
SMTP_SOURCE_STOCK = "smtp-source (stock)"
AIOSMTPLIB = "aiosmtplib"

SMTP_SINK = "smtp-sink"
FASTMTA_SINK = "fastmta sink"


# --------------------------------------------------------------------------
# The aiosmtplib client, run as a child process of this script
# --------------------------------------------------------------------------


def aiosmtplib_client(host: str, port: int, messages: int, connections: int, size: int, timeout: float) -> int:
    """C aiosmtplib clients on uvloop, each on its one reused connection, sending N messages between them.

    This is aiosmtplib's best case: no reconnects, ``SMTP.sendmail`` with the
    message already in bytes. It cannot pipeline, so each message costs
    MAIL, RCPT, DATA and the end-of-data round trips.
    """
    import aiosmtplib
    import uvloop

    from fastmta.load.workload import make_message

    message = make_message(size, SENDER, RECIPIENT)
    claims = itertools.count()
    sent = 0
    failed = 0

    async def one_client() -> None:
        nonlocal sent, failed
        smtp = aiosmtplib.SMTP(hostname=host, port=port, local_hostname=HELO, start_tls=False, timeout=30)
        await smtp.connect()
        try:
            while next(claims) < messages:
                errors, _ = await smtp.sendmail(SENDER, [RECIPIENT], message)
                if errors:
                    failed += 1
                else:
                    sent += 1
        finally:
            await smtp.quit()

    async def main() -> None:
        clients = min(connections, max(messages, 1))
        await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(clients))), timeout)

    uvloop.run(main())
    print(json.dumps({"sent": sent, "failed": failed}))
    return 0 if sent == messages else 1


# --------------------------------------------------------------------------
# Configurations and the commands that run them
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    client: str
    server: str
    size: int
    connections: int
    workers: int = 1  # fastmta load only: processes sharing the connections (--workers)

    @property
    def label(self) -> str:
        client = self.client if self.workers == 1 else f"{self.client} --workers {self.workers}"
        return f"{client} → {self.server}"


@dataclass(slots=True)
class Samples:
    """Raw measurements of one configuration over all rounds."""

    wall_s: list[float] = field(default_factory=list)
    client_cpu_s: list[float] = field(default_factory=list)
    server_cpu_s: list[float] = field(default_factory=list)
    self_reported: list[dict[str, Any]] = field(default_factory=list)  # fastmta load's own --json
    failures: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Bench:
    messages: int
    runs: int
    run_timeout: float
    message_files: dict[int, str]  # size -> path of the message smtp-source sends with -F
    servers: dict[str, Server]

    def command(self, cfg: Config, messages: int) -> list[str]:
        server = self.servers[cfg.server]
        if cfg.client == FASTMTA_LOAD:
            return [
                sys.executable, "-m", "fastmta", "load", server.target, "--messages", str(messages),
                "--connections", str(cfg.connections), "--size", str(cfg.size), "--json", "--quiet",
                "--timeout", str(self.run_timeout), *(["--workers", str(cfg.workers)] if cfg.workers > 1 else []),
            ]
        if cfg.client in (SMTP_SOURCE, SMTP_SOURCE_STOCK):
            # -F sends exactly the message fastmta load generates (smtp-source
            # adds one empty line at the end, 2 bytes); -f/-t/-M give it the
            # same envelope and HELO name. -m is the total over all sessions.
            reuse = ["-d"] if cfg.client == SMTP_SOURCE else []
            return [
                find_tool("smtp-source"), *reuse, "-s", str(cfg.connections), "-m", str(messages),
                "-f", SENDER, "-t", RECIPIENT, "-M", HELO, "-F", self.message_files[cfg.size], server.target,
            ]
        if cfg.client == AIOSMTPLIB:
            return [
                sys.executable, str(Path(__file__).resolve()), "aiosmtplib-client", server.host, str(server.port),
                str(messages), str(cfg.connections), str(cfg.size), str(self.run_timeout),
            ]
        raise ValueError(cfg.client)

    def run_once(self, cfg: Config, messages: int) -> tuple[ChildRun, float, str | None, dict[str, Any] | None]:
        """One client run: (child measurements, server CPU seconds, failure or None, client's own JSON)."""
        server = self.servers[cfg.server]
        cpu_before = server.cpu_seconds()
        run = run_child(self.command(cfg, messages), timeout=self.run_timeout + 10.0)
        server_cpu = server.cpu_seconds() - cpu_before
        report: dict[str, Any] | None = None
        problem: str | None = None
        if run.timed_out:
            problem = "timed out"
        elif run.returncode != 0:
            # The last line of a traceback or of smtp-source's fatal message says what went wrong.
            lines = [ln for ln in run.stderr.decode(errors="replace").splitlines() if ln.strip()]
            problem = f"exit {run.returncode}: {lines[-1].strip()[:300] if lines else 'no message'}"
        if cfg.client in (FASTMTA_LOAD, AIOSMTPLIB) and problem is None:
            try:
                report = json.loads(run.stdout)
            except ValueError:
                problem = f"unreadable output: {run.stdout[:200]!r}"
            else:
                accepted = report.get("messages_accepted", report.get("sent"))
                if accepted != messages:
                    problem = f"{accepted} of {messages} messages accepted"
        return run, server_cpu, problem, report


def build_configs(sizes: list[int], connections: list[int], source_stock: bool, workers: int = 1) -> list[Config]:
    """Every (client, server) pair at every size and connection count.

    With *workers* > 1, also ``fastmta load --workers N → smtp-sink`` wherever
    there are at least as many connections as workers (each worker process
    needs a connection of its own).
    """
    pairs = [
        (FASTMTA_LOAD, SMTP_SINK), (FASTMTA_LOAD, FASTMTA_SINK),
        (SMTP_SOURCE, SMTP_SINK), (SMTP_SOURCE, FASTMTA_SINK),
        (AIOSMTPLIB, SMTP_SINK),
    ]
    configs = [Config(c, s, size, conns) for c, s in pairs for size in sizes for conns in connections]
    if source_stock:
        # Stock smtp-source opens one connection per message: run it only where
        # the acceptance checks need it, to keep TIME_WAIT sockets bounded.
        configs += [Config(SMTP_SOURCE_STOCK, server, size, conns)
                    for server in (SMTP_SINK, FASTMTA_SINK)
                    for size in sizes for conns in connections if conns >= 10]
    if workers > 1:
        configs += [Config(FASTMTA_LOAD, SMTP_SINK, size, conns, workers)
                    for size in sizes for conns in connections if conns >= workers]
    return configs


# --------------------------------------------------------------------------
# Running and reducing
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    config: Config
    messages: int
    runs_ok: int
    messages_per_s: float | None
    client_cpu_us_per_message: float | None
    server_cpu_us_per_message: float | None
    baseline_wall_s: float | None
    baseline_cpu_s: float | None
    failures: list[str]
    samples: Samples

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("config", "samples")}
        d.update(asdict(self.config))
        d["samples"] = asdict(self.samples)
        return d


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run_bench(bench: Bench, configs: list[Config], log: Any) -> list[Result]:
    # Baselines (one message per connection) depend on the client, the server
    # and the connection count, not on the size: keyed without it.
    def base_key(cfg: Config) -> tuple[str, str, int, int]:
        return (cfg.client, cfg.server, cfg.connections, cfg.workers)

    base_wall: dict[tuple[str, str, int, int], list[float]] = {}
    base_cpu: dict[tuple[str, str, int, int], list[float]] = {}
    base_tries: Counter[tuple[str, str, int, int]] = Counter()
    samples = {cfg: Samples() for cfg in configs}
    total = len(configs) * bench.runs
    interactive = sys.stderr.isatty()
    done = 0
    for round_no in range(1, bench.runs + 1):
        for cfg in configs:
            key = base_key(cfg)
            if base_tries[key] < round_no:  # one baseline per key and round, whatever its outcome
                base_tries[key] += 1
                base_cfg = Config(cfg.client, cfg.server, min(c.size for c in configs), cfg.connections, cfg.workers)
                run, _, problem, _ = bench.run_once(base_cfg, cfg.connections)
                if problem is None:
                    base_wall.setdefault(key, []).append(run.wall_s)
                    base_cpu.setdefault(key, []).append(run.cpu_s)
                else:
                    samples[cfg].failures.append(f"baseline: {problem}")
            run, server_cpu, problem, report = bench.run_once(cfg, bench.messages)
            s = samples[cfg]
            if problem is None:
                s.wall_s.append(run.wall_s)
                s.client_cpu_s.append(run.cpu_s)
                s.server_cpu_s.append(server_cpu)
                if report is not None and cfg.client == FASTMTA_LOAD:
                    s.self_reported.append({k: report.get(k) for k in ("messages_per_s", "cpu_us_per_message")})
            else:
                s.failures.append(problem)
            done += 1
            what = f"[{done}/{total}] round {round_no}: {cfg.label}, {cfg.size} B, {cfg.connections} conn"
            if problem:
                log(f"\r{what}  FAILED: {problem}\n")
            elif interactive:
                log(f"\r{what}\x1b[K")  # one progress line, rewritten in place
    if interactive:
        log("\r\x1b[K")

    results = []
    for cfg in configs:
        s = samples[cfg]
        key = base_key(cfg)
        bw, bc = _median(base_wall.get(key, [])), _median(base_cpu.get(key, []))
        marginal = bench.messages - cfg.connections
        rate = cpu = srv = None
        ok = 0
        if bw is not None and bc is not None and s.wall_s and marginal > 0:
            # A run so short that it does not clearly outlast the baseline
            # cannot be measured by difference: its figure would be noise (or
            # negative). Such samples are dropped and reported, not averaged in.
            valid = [(w, c) for w, c in zip(s.wall_s, s.client_cpu_s) if w - bw > 0.01 and c - bc > 0]
            if len(valid) < len(s.wall_s):
                s.failures.append(f"{len(s.wall_s) - len(valid)} run(s) too short to measure against the "
                                  "baseline: use more --messages")
            ok = len(valid)
            if valid:
                rate = _median([marginal / (w - bw) for w, _ in valid])
                cpu = _median([(c - bc) * 1e6 / marginal for _, c in valid])
        if s.server_cpu_s:
            srv = _median([c * 1e6 / bench.messages for c in s.server_cpu_s])
        results.append(Result(cfg, bench.messages, ok, rate, cpu, srv, bw, bc, s.failures, s))
    return results


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[Result], runs: int) -> str:
    head = ("client → server", "size", "conn", "msgs/s", "client µs/msg", "server µs/msg", "ok runs")
    rows = [
        (r.config.label, f"{r.config.size // 1024} KB" if r.config.size % 1024 == 0 else f"{r.config.size} B",
         str(r.config.connections), _fmt(r.messages_per_s, ",.0f"), _fmt(r.client_cpu_us_per_message, ".1f"),
         _fmt(r.server_cpu_us_per_message, ".1f"), f"{r.runs_ok}/{runs}")
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool | None  # None: could not be computed (configuration not run or failed)
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        return f"{verdict}  {self.name}: {self.detail}"


def _ratio_check(name: str, a: float | None, b: float | None, op: str, factor: float, unit: str) -> Check:
    """Compare two medians: a OP factor * b, with op one of ">=", ">" and "<="."""
    if a is None or b is None or b <= 0:
        return Check(name, None, "not measured")
    ok = {">=": a >= factor * b, ">": a > factor * b, "<=": a <= factor * b}[op]
    return Check(name, ok, f"{a:,.1f} vs {b:,.1f} {unit} = {a / b:.2f}x (need {op} {factor:g}x)")


class _Medians:
    """The medians of one (size, connections) cell, looked up by client, server and workers."""

    def __init__(self, results: list[Result], size: int, connections: int) -> None:
        self._by = {(r.config.client, r.config.server, r.config.workers): r for r in results
                    if r.config.size == size and r.config.connections == connections}

    def get(self, client: str, server: str, attr: str, workers: int = 1) -> float | None:
        r = self._by.get((client, server, workers))
        value: float | None = getattr(r, attr) if r is not None else None
        return value


def acceptance(results: list[Result], size: int = 2048, connections: int = 10) -> list[Check]:
    """Issue 2, acceptance item 3, from the medians at 2 KB and 10 connections.

    The issue's reference is "smtp-source → smtp-sink": smtp-source as it
    runs by default, one message per connection. See :func:`reuse_reference`
    for the same comparisons against smtp-source with connection reuse (-d).
    """
    get = _Medians(results, size, connections).get
    ratio_check = _ratio_check

    load_rate = get(FASTMTA_LOAD, SMTP_SINK, "messages_per_s")
    load_cpu = get(FASTMTA_LOAD, SMTP_SINK, "client_cpu_us_per_message")
    return [
        ratio_check("fastmta load msgs/s >= 5x aiosmtplib (→ smtp-sink)", load_rate,
                    get(AIOSMTPLIB, SMTP_SINK, "messages_per_s"), ">=", 5.0, "msgs/s"),
        ratio_check("fastmta load msgs/s >= 1x smtp-source (→ smtp-sink)", load_rate,
                    get(SMTP_SOURCE_STOCK, SMTP_SINK, "messages_per_s"), ">=", 1.0, "msgs/s"),
        ratio_check("fastmta load client CPU/msg <= 0.6x smtp-source (→ smtp-sink)", load_cpu,
                    get(SMTP_SOURCE_STOCK, SMTP_SINK, "client_cpu_us_per_message"), "<=", 0.6, "µs/msg"),
        ratio_check("fastmta sink CPU/msg <= 1.3x smtp-sink (under smtp-source)",
                    get(SMTP_SOURCE_STOCK, FASTMTA_SINK, "server_cpu_us_per_message"),
                    get(SMTP_SOURCE_STOCK, SMTP_SINK, "server_cpu_us_per_message"), "<=", 1.3, "µs/msg"),
    ]


def reuse_reference(results: list[Result], size: int = 2048, connections: int = 10) -> list[Check]:
    """The same client comparisons against smtp-source -d (connection reuse, like fastmta load).

    Informational: a harder reference than the issue's, reported so that the
    figures are not read as more than they are.
    """
    get = _Medians(results, size, connections).get
    return [
        _ratio_check("fastmta load msgs/s vs smtp-source -d", get(FASTMTA_LOAD, SMTP_SINK, "messages_per_s"),
                     get(SMTP_SOURCE, SMTP_SINK, "messages_per_s"), ">=", 1.0, "msgs/s"),
        _ratio_check("fastmta load client CPU/msg vs smtp-source -d",
                     get(FASTMTA_LOAD, SMTP_SINK, "client_cpu_us_per_message"),
                     get(SMTP_SOURCE, SMTP_SINK, "client_cpu_us_per_message"), "<=", 0.6, "µs/msg"),
        _ratio_check("fastmta sink CPU/msg vs smtp-sink under smtp-source -d",
                     get(SMTP_SOURCE, FASTMTA_SINK, "server_cpu_us_per_message"),
                     get(SMTP_SOURCE, SMTP_SINK, "server_cpu_us_per_message"), "<=", 1.3, "µs/msg"),
    ]


def acceptance_issue7(results: list[Result], workers: int, size: int = 2048, connections: int = 10) -> list[Check]:
    """Issue 7, acceptance item 1, at 2 KB and 10 connections, from the same run's medians.

    ``fastmta load`` → smtp-sink against ``smtp-source`` → smtp-sink at the
    same size and connections: at least its messages/s at <= 0.6x its client
    CPU per message; and ``fastmta load --workers N`` reaches more messages/s
    than one ``fastmta load`` process.
    """
    get = _Medians(results, size, connections).get
    load_rate = get(FASTMTA_LOAD, SMTP_SINK, "messages_per_s")
    checks = [
        _ratio_check("fastmta load msgs/s >= 1x smtp-source (→ smtp-sink)", load_rate,
                     get(SMTP_SOURCE_STOCK, SMTP_SINK, "messages_per_s"), ">=", 1.0, "msgs/s"),
        _ratio_check("fastmta load client CPU/msg <= 0.6x smtp-source (→ smtp-sink)",
                     get(FASTMTA_LOAD, SMTP_SINK, "client_cpu_us_per_message"),
                     get(SMTP_SOURCE_STOCK, SMTP_SINK, "client_cpu_us_per_message"), "<=", 0.6, "µs/msg"),
    ]
    name = f"fastmta load --workers {workers} msgs/s > 1 process (→ smtp-sink)"
    if workers > 1:
        checks.append(_ratio_check(name, get(FASTMTA_LOAD, SMTP_SINK, "messages_per_s", workers), load_rate,
                                   ">", 1.0, "msgs/s"))
    else:
        checks.append(Check(name.replace(f"--workers {workers}", "--workers N"), None, "not run (--workers 1)"))
    return checks


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _int_list(value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not items or any(i < 1 for i in items):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return items


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=None, help="rounds; each configuration runs once per round (default 5, --quick 3)")
    p.add_argument("--messages", "-m", type=int, default=None, help="messages per run (default 20000, --quick 2000)")
    p.add_argument("--sizes", type=_int_list, default=[2048, 20480], help="message sizes in bytes (default 2048,20480)")
    p.add_argument("--connections", type=_int_list, default=[1, 10], help="connection counts (default 1,10)")
    p.add_argument("--quick", action="store_true", help="fewer messages and 3 rounds: checks the benchmark works (< 1 min)")
    p.add_argument("--no-source-stock", dest="source_stock", action="store_false",
                   help="skip smtp-source in its default mode (one message per session), the acceptance reference")
    p.add_argument("--workers", type=int, default=2,
                   help="also run fastmta load --workers N → smtp-sink wherever connections >= N (issue 7; "
                        "default 2, 1 leaves the row out)")
    p.add_argument("--run-timeout", type=float, default=120.0, help="seconds before a client run is killed (default 120)")
    p.add_argument("--json", metavar="FILE", help="write all results (medians and raw samples) here")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.quick else 5
    if args.messages is None:
        args.messages = 2000 if args.quick else 20_000
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if args.messages <= max(args.connections):
        p.error("--messages must exceed the largest connection count (per-message figures are marginal)")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["aiosmtplib-client"]:
        host, port, messages, connections, size, timeout = argv[1:7]
        return aiosmtplib_client(host, int(port), int(messages), int(connections), int(size), float(timeout))

    args = parse_args(argv)
    from fastmta.load.workload import make_message

    def log(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    started = time.monotonic()
    configs = build_configs(args.sizes, args.connections, args.source_stock, args.workers)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-smtp-") as tmp:
        # smtp-source -F appends CRLF to each line itself: the file holds bare LFs.
        message_files = {}
        for size in args.sizes:
            path = os.path.join(tmp, f"message-{size}.txt")
            Path(path).write_bytes(make_message(size, SENDER, RECIPIENT).replace(b"\r\n", b"\n"))
            message_files[size] = path
        servers = {
            SMTP_SINK: stack.enter_context(postfix_smtp_sink()),
            FASTMTA_SINK: stack.enter_context(fastmta_sink()),
        }
        log(f"smtp-sink on {servers[SMTP_SINK].target}, fastmta sink on {servers[FASTMTA_SINK].target}; "
            f"{len(configs)} configurations x {args.runs} rounds, {args.messages} messages per run\n")
        bench = Bench(args.messages, args.runs, args.run_timeout, message_files, servers)
        results = run_bench(bench, configs, log)
    elapsed = time.monotonic() - started

    checks = acceptance(results)
    checks7 = acceptance_issue7(results, args.workers)
    reference = reuse_reference(results)
    print(table(results, args.runs))
    print()
    print(f"median of {args.runs} rounds, {args.messages} messages per run, marginal per-message figures "
          f"(start-up and connection setup excluded), {elapsed:.0f} s total"
          + ("  [--quick: figures are indicative only]" if args.quick else ""))
    print()
    for r in results:
        # fastmta load measures itself too (from its first connection to its
        # last reply, process_time()); a large gap to the figures above would
        # mean the outside measurement is off.
        own = r.samples.self_reported
        if r.config.client == FASTMTA_LOAD and own:
            print(f"cross-check, {r.config.label.split(' → ')[0]}'s own figures → {r.config.server}, {r.config.size} B, "
                  f"{r.config.connections} conn: {statistics.median(x['messages_per_s'] for x in own):,.0f} msgs/s, "
                  f"{statistics.median(x['cpu_us_per_message'] for x in own):.1f} µs/msg")
    print()
    print("Acceptance (issue 2, item 3; 2 KB, 10 connections):")
    for check in checks:
        print("  " + check.line())
    print()
    print("Acceptance (issue 7, item 1; 2 KB, 10 connections):")
    for check in checks7:
        print("  " + check.line())
    print()
    print("For reference, not acceptance items: the same against smtp-source -d (connection reuse):")
    for check in reference:
        print("  " + check.line().replace("PASS", "info").replace("FAIL", "info"))
    failures = [(r.config.label, r.config.size, r.config.connections, f) for r in results for f in r.failures]
    if failures:
        print()
        print("Failed runs:")
        # The same failure tends to repeat in every round: print it once, with a count.
        for (label, msg_size, conns, why), n in Counter(failures).items():
            print(f"  {label}, {msg_size} B, {conns} conn: {why}" + (f"  (x{n})" if n > 1 else ""))

    if args.json:
        doc = {
            "argv": [sys.executable, *sys.argv],
            "quick": args.quick,
            "runs": args.runs,
            "messages": args.messages,
            "elapsed_s": elapsed,
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
            "method": "marginal per-message: (cpu(N) - median cpu(C)) / (N - C) and (N - C) / (wall(N) - median "
                      "wall(C)), C = connections; server CPU = /proc/PID/stat delta / N; medians over rounds",
            "results": [r.as_dict() for r in results],
            "workers": args.workers,
            "acceptance": [asdict(c) for c in checks],
            "acceptance_issue7": [asdict(c) for c in checks7],
            "reference_smtp_source_reuse": [asdict(c) for c in reference],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    if failures:
        return 1
    return 2 if any(c.ok is False for c in (*checks, *checks7)) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
