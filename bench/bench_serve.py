#!/usr/bin/env python3
"""End to end: ``fastmta serve`` against a private Postfix, both injected by smtp-source and delivering to smtp-sink.

Issue 14's benchmark, everything on loopback, same run. For each MTA and each
round, from scratch (a new queue, a new MTA process tree, a new sink):

    smtp-source (20 sessions, 100 domains) --SMTP--> MTA --SMTP--> smtp-sink

* (a) ``python -m fastmta serve --config F``: one SMTP injection listener,
  durable queue and accounting log in its data directory (it answers 250 to
  DATA only after the journal commit), everything routed by
  ``[routing.static] "*"`` to the sink;
* (b) a private Postfix instance (tests/postfix_private.py: its own
  config/queue/data directories, stock performance settings; smtpd -> cleanup
  -> queue (fsynced) -> qmgr -> smtp, everything to the sink as its
  ``relayhost``), logging to a file through its own postlogd (this machine
  has no syslog; fastmta's accounting log is the counterpart).

Injection: N messages (default 50,000) of 2 KB (``fastmta load``'s message
for that size, given to smtp-source with ``-F``), one recipient each, over
100 recipient domains, 20 SMTP sessions at any time. smtp-source takes one
recipient address per process (``-t``; ``-N`` only prefixes a number to the
local part), so the injection is 20 lanes, each running ``smtp-source -s 1
-d -N -m K -t rcpt@dXX.bench.example`` for 5 domains one after the other:
20 concurrent sessions, each domain N/100 messages, connections reused
(``-d``) as an application would. A lane that fails fails the run.

Measured per run:

* msgs/s: N / (time of the N-th message at the sink - time the first
  smtp-source was started). The sink is Postfix's smtp-sink with ``-c``: it
  writes ``sess=.. quit=.. mesg=K`` to its stdout (a file) on every ".";
  the script polls it every 20 ms. Start-up of the MTA is not in the wall
  time (it is started and proved ready before).
* CPU per message: the MTA's processes only (not smtp-source, not the sink,
  not this script), from the birth of the MTA's process tree (start-up
  included) to the end of the run (once the MTA is idle: every recipient in
  fastmta's accounting log / Postfix's queue empty), divided by N. A tree's
  CPU is read from /proc: the root's utime + stime + cutime + cstime (its
  own, and that of every child it has reaped) plus utime + stime + cutime +
  cstime of every descendant still there (zombies included: they are not in
  their parent's cutime yet). The root of fastmta's tree is the ``fastmta
  serve`` process; Postfix's is its master, which reaps every daemon it
  spawns (smtpd, cleanup, qmgr, trivial-rewrite, smtp, scache, anvil,
  postlogd...), so a daemon that exited during the run is in the master's
  cutime. The snapshot is repeated until the root's cutime did not change
  while the descendants were read (a child reaped in between would be
  counted twice or not at all). Not counted for Postfix: the ``postfix
  start`` command itself (shell scripts; the master it starts is counted from
  its birth); it is in the JSON as ``start_command_cpu_s``.

Medians over ``--runs`` rounds (default 3; the MTAs alternate which goes
first). The goal (issue 14): fastmta >= 5x Postfix's msgs/s at <= 0.2x its
CPU per message.

Exit status: 0 every run completed and the goal is met; 1 a run failed
(crash, timeout, not every message delivered exactly once); 2 every run
completed but the goal is not met.

Usage:
  python bench/bench_serve.py --json bench/serve-results.json    # 50,000 messages x 3 rounds (on a quiet machine)
  python bench/bench_serve.py --quick                            # 2,000 messages, 1 round: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))
from _util import find_tool, free_port, greeting, proc_cpu_seconds, text_table  # noqa: E402
from postfix_private import private_postfix, proc_stat  # noqa: E402

SENDER = "app@inject.bench.example"
HELO = "inject.bench.example"
SIZE = 2048
DOMAINS = 100
SESSIONS = 20
FASTMTA = "fastmta serve"
POSTFIX = "Postfix"
GOAL_RATE = 5.0  # fastmta msgs/s >= 5x Postfix's
GOAL_CPU = 0.2  # fastmta CPU/msg <= 0.2x Postfix's
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_MESG = re.compile(rb"mesg=(\d+)")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# CPU of a process tree
# --------------------------------------------------------------------------


@dataclass
class TreeCpu:
    """CPU seconds of a process tree from its root's birth: root (incl. reaped children) + live descendants."""

    total_s: float
    by_name: dict[str, float]  # live processes by command name; "(exited, reaped by root)" for the rest
    processes: int
    attempts: int


def _stat_fields(st: list[bytes]) -> tuple[int, int, int, int]:
    return int(st[11]), int(st[12]), int(st[13]), int(st[14])


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def tree_cpu(root: int, tries: int = 50) -> TreeCpu:
    """A consistent snapshot of the CPU of *root* and all its descendants (see the module docstring)."""
    for attempt in range(1, tries + 1):
        before = proc_stat(root)
        if before is None:
            raise RuntimeError(f"process {root} is gone")
        parent: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                st = proc_stat(int(entry.name))
                if st is not None:
                    parent[int(entry.name)] = int(st[1])
        children: dict[int, list[int]] = {}
        for pid, ppid in parent.items():
            children.setdefault(ppid, []).append(pid)
        todo, tree = list(children.get(root, [])), []
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        by_name: dict[str, int] = {}
        for pid in tree:
            st = proc_stat(pid)
            if st is not None:
                name = _comm(pid)
                by_name[name] = by_name.get(name, 0) + sum(_stat_fields(st))
        after = proc_stat(root)
        if after is None:
            raise RuntimeError(f"process {root} is gone")
        if _stat_fields(before)[2:] == _stat_fields(after)[2:]:
            u, s, cu, cs = _stat_fields(after)
            names = {"(root) " + _comm(root): (u + s) / _CLK_TCK, "(exited, reaped by root)": (cu + cs) / _CLK_TCK}
            names.update({k: v / _CLK_TCK for k, v in by_name.items()})
            return TreeCpu(sum(names.values()), names, len(tree) + 1, attempt)
    raise RuntimeError(f"no consistent CPU snapshot of process tree {root} in {tries} tries")


# --------------------------------------------------------------------------
# The sink: Postfix's smtp-sink, counting
# --------------------------------------------------------------------------


@dataclass
class CountingSink:
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    counter: Path

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def cpu_s(self) -> float:
        """CPU seconds (user + system) smtp-sink has used so far: one process, event-driven."""
        return proc_cpu_seconds(self.proc.pid)

    def count(self) -> int:
        """Messages received so far ("." seen), from the last counter line smtp-sink wrote."""
        try:
            with open(self.counter, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 200))
                tail = f.read()
        except FileNotFoundError:
            return 0
        found = _MESG.findall(tail)
        return int(found[-1]) if found else 0


@contextmanager
def counting_sink(workdir: Path, host: str = "127.0.0.1") -> Iterator[CountingSink]:
    """smtp-sink -c on a verified free port (random token in its greeting), stdout to a file; stopped by PID.

    Our own probe connection ends with QUIT before any message, so it adds to the session counters only.
    """
    exe = find_tool("smtp-sink")
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    why = "no attempt made"
    for attempt in range(5):
        token = "sink" + secrets.token_hex(6)
        port = free_port(host)
        counter = workdir / f"sink-{port}-{attempt}.counter"
        with open(counter, "wb") as out, open(workdir / f"sink-{port}-{attempt}.err", "wb") as err:
            proc = subprocess.Popen([exe, *user, "-c", "-m", "1024", "-h", token, f"{host}:{port}", "1024"],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            verified = False
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and proc.poll() is None:
                banner = greeting(host, port, 1.0)
                if banner is not None:
                    verified = token.encode() in banner
                    break
                time.sleep(0.02)
            if verified:
                yield CountingSink(host, port, proc, counter)
                return
            why = "another server answered on the port" if proc.poll() is None else "smtp-sink exited"
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
    raise RuntimeError(f"could not start smtp-sink: {why}")


# --------------------------------------------------------------------------
# Injection: 20 lanes of smtp-source, 100 domains
# --------------------------------------------------------------------------


def plan_lanes(n: int, domains: int = DOMAINS, sessions: int = SESSIONS) -> list[list[tuple[str, int]]]:
    """(recipient, messages) per lane: domain i goes to lane i % sessions; N spread evenly over the domains."""
    lanes: list[list[tuple[str, int]]] = [[] for _ in range(min(sessions, domains))]
    for i in range(domains):
        count = n // domains + (1 if i < n % domains else 0)
        if count:
            lanes[i % len(lanes)].append((f"rcpt@d{i:03d}.bench.example", count))
    return [lane for lane in lanes if lane]


class Injection:
    """The smtp-source lanes of one run, in threads; every process stoppable by PID."""

    def __init__(self, target: str, message_file: Path, n: int) -> None:
        self.exe = find_tool("smtp-source")
        self.target = target
        self.message_file = message_file
        self.lanes = plan_lanes(n)
        self.failures: list[str] = []
        self.finished_at: float | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._threads = [threading.Thread(target=self._lane, args=(lane,), daemon=True) for lane in self.lanes]

    def _lane(self, lane: list[tuple[str, int]]) -> None:
        for rcpt, count in lane:
            cmd = [self.exe, "-s", "1", "-d", "-N", "-m", str(count), "-M", HELO, "-f", SENDER, "-t", rcpt,
                   "-F", str(self.message_file), self.target]
            with self._lock:
                if self._stopped:
                    return
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
                self._procs.append(proc)
            _, err = proc.communicate()
            if proc.returncode != 0:
                with self._lock:
                    if not self._stopped:
                        self.failures.append(f"smtp-source -t {rcpt} exited with {proc.returncode}: "
                                             f"{err.decode(errors='replace').strip()[-300:]}")
                return

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def done(self) -> bool:
        if any(t.is_alive() for t in self._threads):
            return False
        if self.finished_at is None:
            self.finished_at = time.perf_counter()
        return True

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for proc in self._procs:
                if proc.poll() is None:
                    proc.kill()
        for t in self._threads:
            t.join(10)


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


@dataclass
class Run:
    mta: str
    round: int
    n: int
    ok: bool = False
    failure: str = ""
    wall_s: float | None = None  # first smtp-source started -> N-th message at the sink
    msgs_per_s: float | None = None
    injection_s: float | None = None  # first smtp-source started -> last one exited (all accepted)
    cpu_s: float | None = None  # the MTA's tree from its birth to the end of the run (start-up included)
    cpu_us_per_msg: float | None = None
    startup_cpu_s: float | None = None  # the same, when the injection started
    steady_cpu_us_per_msg: float | None = None  # (cpu_s - startup_cpu_s) / n
    sink_count: int | None = None
    delivered: int | None = None  # the MTA's own record: accounting lines / Postfix log status=sent
    startup_wall_s: float | None = None
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    processes_at_end: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _wait(pred: Any, timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def measure(run: Run, root_pid: int, target: str, sink: CountingSink, message_file: Path, timeout: float,
            idle: Any, delivered: Any) -> None:
    """Inject, wait for the N-th message at the sink, wait until the MTA is idle, take its CPU; fills *run*."""
    n = run.n
    run.startup_cpu_s = tree_cpu(root_pid).total_s
    injection = Injection(target, message_file, n)
    t0 = time.perf_counter()
    injection.start()
    deadline = t0 + timeout
    seen = 0
    try:
        while True:
            seen = sink.count()
            if seen >= n:
                run.wall_s = time.perf_counter() - t0
                break
            injection.done()
            if injection.failures:
                run.failure = injection.failures[0]
                return
            if time.perf_counter() > deadline:
                run.failure = f"timeout after {timeout:g} s: {seen} of {n} messages at the sink"
                return
            time.sleep(0.02)
        if not _wait(injection.done, 30):
            run.failure = "smtp-source still running after the sink had every message"
            return
    finally:
        injection.stop()
    if injection.finished_at is not None:
        run.injection_s = injection.finished_at - t0
    if injection.failures:
        run.failure = injection.failures[0]
        return
    run.msgs_per_s = n / run.wall_s
    if not _wait(idle, 60, 0.1):
        run.failure = "the MTA did not become idle within 60 s of the last delivery"
        return
    cpu = tree_cpu(root_pid)
    run.cpu_s, run.cpu_by_process, run.processes_at_end = cpu.total_s, cpu.by_name, cpu.processes
    run.cpu_us_per_msg = cpu.total_s / n * 1e6
    run.steady_cpu_us_per_msg = (cpu.total_s - run.startup_cpu_s) / n * 1e6
    _wait(lambda: delivered() >= n, 10, 0.2)  # Postfix's log is written asynchronously
    run.delivered = delivered()
    time.sleep(0.2)  # nothing more should arrive: a duplicate would show here
    run.sink_count = sink.count()
    if run.sink_count != n or run.delivered != n:
        run.failure = f"sink got {run.sink_count}, the MTA reports {run.delivered} delivered, of {n}"
        return
    run.ok = True


def fastmta_config(data_dir: Path, sink: tuple[str, int], adaptive: bool) -> str:
    lines = [
        "[routing.static]", f'"*" = ["{sink[0]}:{sink[1]}"]', "",
        "[smtp]", 'tls = "never"', "",
    ]
    if not adaptive:
        lines += ['[sites."*".adaptive]', "enabled = false", ""]
    lines += [
        "[serve]", 'hostname = "mta.bench.example"', f'data_dir = "{data_dir}"', "",
        "[[serve.smtp]]", 'listen = "127.0.0.1:0"', "",
    ]
    return "\n".join(lines)


class AccountingCounter:
    """Delivered recipients in fastmta's accounting log, read incrementally (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.delivered = 0
        self.lines = 0

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        end = data.rfind(b"\n") + 1
        chunk = data[:end]
        self.offset += end
        self.lines += chunk.count(b"\n")
        self.delivered += chunk.count(b'"status":"delivered"')
        return self.delivered


def run_fastmta(rnd: int, args: argparse.Namespace, workdir: Path, message_file: Path) -> Run:
    from serveproc import start_serve, stop_serve

    run = Run(FASTMTA, rnd, args.n)
    rundir = Path(tempfile.mkdtemp(prefix=f"fastmta-{rnd}-", dir=workdir))
    data = rundir / "data"
    data.mkdir()
    with counting_sink(rundir) as sink:
        cfg = rundir / "fastmta.toml"
        cfg.write_text(fastmta_config(data, sink.address, args.adaptive))
        t = time.perf_counter()
        served = start_serve(cfg, data, timeout=60)
        run.startup_wall_s = time.perf_counter() - t
        try:
            host, port = served.smtp
            counter = AccountingCounter(data / "accounting.jsonl")
            measure(run, served.proc.pid, f"{host}:{port}", sink, message_file, args.run_timeout,
                    idle=lambda: counter() >= args.n, delivered=counter)
            run.extra["accounting_lines"] = counter.lines
        finally:
            rc = stop_serve(served)
            run.extra["exit_status"] = rc
            if rc not in (0, None) and not run.failure:
                run.ok, run.failure = False, f"fastmta serve exited with {rc}"
    run.extra["config"] = cfg.read_text()
    run.extra["log_tail"] = (rundir / "data-serve.log").read_text(errors="replace")[-2000:] if not run.ok else ""
    return run


def run_postfix(rnd: int, args: argparse.Namespace, workdir: Path, message_file: Path) -> Run:
    run = Run(POSTFIX, rnd, args.n)
    rundir = Path(tempfile.mkdtemp(prefix=f"postfix-{rnd}-", dir=workdir))
    rundir.chmod(0o755)
    with counting_sink(rundir) as sink:
        start_cpu = os.times()
        t = time.perf_counter()
        with private_postfix(sink.address, base_dir=rundir, start_timeout=60, main_cf=args.postfix_set) as pf:
            run.startup_wall_s = time.perf_counter() - t
            after = os.times()
            # postfix start's scripts are our children: their CPU is in our children's times.
            run.extra["start_command_cpu_s"] = (after.children_user - start_cpu.children_user
                                                + after.children_system - start_cpu.children_system)
            master = pf.master_pid
            if master is None:
                run.failure = "the Postfix master is not running"
                return run
            # Without a log file (--postfix-set maillog_file=) the only record of delivery is the sink's.
            delivered = pf.sent_count if pf.main_cf.get("maillog_file") else sink.count
            measure(run, master, pf.target, sink, message_file, args.run_timeout,
                    idle=lambda: pf.queued() == 0, delivered=delivered)
            run.extra["main_cf"] = dict(pf.main_cf)
            if not run.ok:
                run.extra["log_tail"] = pf.log_tail(2000)
                run.extra["queue"] = pf.queue_counts()
    return run


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


@dataclass
class Summary:
    mta: str
    runs: int
    ok_runs: int
    msgs_per_s: float | None
    cpu_us_per_msg: float | None
    steady_cpu_us_per_msg: float | None
    injection_msgs_per_s: float | None
    startup_cpu_s: float | None
    startup_wall_s: float | None


def summarize(runs: list[Run], mta: str) -> Summary:
    mine = [r for r in runs if r.mta == mta]
    ok = [r for r in mine if r.ok]
    return Summary(
        mta, len(mine), len(ok),
        _median([r.msgs_per_s for r in ok]), _median([r.cpu_us_per_msg for r in ok]),
        _median([r.steady_cpu_us_per_msg for r in ok]),
        _median([r.n / r.injection_s if r.injection_s else None for r in ok]),
        _median([r.startup_cpu_s for r in ok]), _median([r.startup_wall_s for r in ok]),
    )


@dataclass
class Check:
    name: str
    ok: bool | None
    detail: str


def checks(fm: Summary, pf: Summary) -> list[Check]:
    out = []
    if fm.msgs_per_s is None or pf.msgs_per_s is None:
        out.append(Check(f"fastmta serve msgs/s >= {GOAL_RATE:g}x Postfix", None, "not measured"))
    else:
        r = fm.msgs_per_s / pf.msgs_per_s
        out.append(Check(f"fastmta serve msgs/s >= {GOAL_RATE:g}x Postfix", r >= GOAL_RATE,
                         f"{fm.msgs_per_s:,.0f} vs {pf.msgs_per_s:,.0f} msgs/s = {r:.2f}x (need >= {GOAL_RATE:g}x)"))
    if fm.cpu_us_per_msg is None or pf.cpu_us_per_msg is None:
        out.append(Check(f"fastmta serve CPU/msg <= {GOAL_CPU:g}x Postfix", None, "not measured"))
    else:
        r = fm.cpu_us_per_msg / pf.cpu_us_per_msg
        out.append(Check(f"fastmta serve CPU/msg <= {GOAL_CPU:g}x Postfix", r <= GOAL_CPU,
                         f"{fm.cpu_us_per_msg:,.1f} vs {pf.cpu_us_per_msg:,.1f} µs/msg = {r:.3f}x "
                         f"(need <= {GOAL_CPU:g}x)"))
    return out


def table(summaries: list[Summary]) -> str:
    head = ["MTA", "msgs/s", "CPU µs/msg", "steady µs/msg", "injected msgs/s", "start-up CPU s", "ok runs"]
    rows = [[s.mta, _fmt(s.msgs_per_s, ",.0f"), _fmt(s.cpu_us_per_msg, ",.1f"), _fmt(s.steady_cpu_us_per_msg, ",.1f"),
             _fmt(s.injection_msgs_per_s, ",.0f"), _fmt(s.startup_cpu_s, ".2f"), f"{s.ok_runs}/{s.runs}"]
            for s in summaries]
    fm, pf = summaries
    if fm.msgs_per_s and pf.msgs_per_s and fm.cpu_us_per_msg and pf.cpu_us_per_msg:
        rows.append(["fastmta / Postfix", f"{fm.msgs_per_s / pf.msgs_per_s:.2f}x",
                     f"{fm.cpu_us_per_msg / pf.cpu_us_per_msg:.3f}x",
                     _fmt(fm.steady_cpu_us_per_msg / pf.steady_cpu_us_per_msg, ".3f") + "x"
                     if fm.steady_cpu_us_per_msg and pf.steady_cpu_us_per_msg else "-",
                     _fmt(fm.injection_msgs_per_s / pf.injection_msgs_per_s, ".2f") + "x"
                     if fm.injection_msgs_per_s and pf.injection_msgs_per_s else "-", "", ""])
    return text_table(head, rows)


def cpu_breakdown(runs: list[Run], mta: str) -> str:
    """Median CPU µs/msg by process name over the successful runs (names summed per run)."""
    ok = [r for r in runs if r.mta == mta and r.ok]
    if not ok:
        return ""
    names = sorted({k for r in ok for k in r.cpu_by_process})
    per = {k: _median([r.cpu_by_process.get(k, 0.0) / r.n * 1e6 for r in ok]) for k in names}
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -(kv[1] or 0)) if v)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="messages per run (default 50000; --quick 2000)")
    p.add_argument("--runs", type=int, default=None, help="rounds; each runs both MTAs (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="2,000 messages, 1 round: a smoke test, not a measurement")
    p.add_argument("--only", choices=["fastmta", "postfix"], help="run one MTA only (no ratios, no checks)")
    p.add_argument("--adaptive", action="store_true",
                   help='keep fastmta\'s adaptive throttle on (default: [sites."*".adaptive] enabled = false: '
                        "a loopback sink never pushes back)")
    p.add_argument("--postfix-set", action="append", default=[], metavar="NAME=VALUE",
                   help="a main.cf setting for the Postfix instance, over the test instance's (repeatable); e.g. "
                        "maillog_file= (no log file: no postlogd work, delivery checked by the sink only)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where queues, data directories and logs go (default: a new directory under /tmp); it "
                        "must be on the file system you mean to measure, and traversable by the postfix user")
    p.add_argument("--keep", action="store_true", help="keep the work directory (fastmta's data, logs)")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds per run (default: 120 + N/50)")
    p.add_argument("--json", type=Path, help="write medians, every run and the checks here")
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 2000 if args.quick else 50_000
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.run_timeout is None:
        args.run_timeout = 120 + args.n / 50
    settings = {}
    for item in args.postfix_set:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            p.error(f"--postfix-set wants NAME=VALUE, not {item!r}")
        settings[name.strip()] = value.strip()
    args.postfix_set = settings
    if args.n < DOMAINS:
        p.error(f"--n must be at least {DOMAINS} (one message per domain)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from fastmta.load.workload import make_message

    if os.geteuid() != 0 and args.only != "fastmta":
        _log("a private Postfix instance needs root; run as root or with --only fastmta")
        return 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-serve-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    message_file = workdir / "message.txt"
    # smtp-source -F appends CRLF to each line itself: the file holds bare LFs.
    message_file.write_bytes(make_message(SIZE, SENDER, "rcpt@bench.example").replace(b"\r\n", b"\n"))
    message_file.chmod(0o644)

    mtas = [(FASTMTA, run_fastmta), (POSTFIX, run_postfix)]
    if args.only:
        mtas = [m for m in mtas if (m[0] == FASTMTA) == (args.only == "fastmta")]
    started = time.monotonic()
    runs: list[Run] = []
    _log(f"{args.n:,} messages x {args.runs} round(s), {SESSIONS} sessions, {DOMAINS} domains; work dir {workdir}")
    # Ctrl-C: finish cleanly (every context manager stops its processes by PID).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for rnd in range(args.runs):
            order = mtas if rnd % 2 == 0 else mtas[::-1]
            for name, fn in order:
                _log(f"round {rnd + 1}/{args.runs}: {name} ...")
                try:
                    run = fn(rnd, args, workdir, message_file)
                except Exception as exc:
                    run = Run(name, rnd, args.n, failure=f"{type(exc).__name__}: {exc}")
                runs.append(run)
                _log(f"  {name}: " + (f"{run.msgs_per_s:,.0f} msgs/s, {run.cpu_us_per_msg:,.1f} µs/msg CPU "
                                      f"(start-up {run.startup_cpu_s:.2f} s), injected in {run.injection_s:.1f} s"
                                      if run.ok else f"FAILED: {run.failure}"))
    except KeyboardInterrupt:
        _log("interrupted")
    elapsed = time.monotonic() - started

    summaries = [summarize(runs, FASTMTA), summarize(runs, POSTFIX)]
    result_checks = checks(*summaries) if not args.only else []
    print(table(summaries))
    print()
    print(f"median of {args.runs} round(s), {args.n:,} messages of {SIZE} B per run, {SESSIONS} sessions, "
          f"{DOMAINS} domains; CPU = the MTA's processes from their start (start-up included); "
          f"{elapsed:.0f} s total" + ("  [--quick: figures are indicative only]" if args.quick else ""))
    for name in (FASTMTA, POSTFIX):
        text = cpu_breakdown(runs, name)
        if text:
            print(f"  {name} CPU µs/msg by process: {text}")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
    if result_checks:
        print()
        print(f"Goal (issue 14): fastmta serve >= {GOAL_RATE:g}x Postfix's msgs/s at <= {GOAL_CPU:g}x its CPU/msg")
        verdicts = {True: "PASS", False: "FAIL", None: "SKIP"}
        for c in result_checks:
            print(f"  {verdicts[c.ok]}  {c.name}: {c.detail}")
    failed = [r for r in runs if not r.ok]
    if failed:
        print()
        print("Failed runs:")
        for (mta, why), k in Counter((r.mta, r.failure) for r in failed).items():
            print(f"  {mta}: {why}" + (f"  (x{k})" if k > 1 else ""))

    if args.json:
        doc = {
            "argv": [sys.executable, *sys.argv],
            "quick": args.quick,
            "n": args.n,
            "runs": args.runs,
            "message_bytes": SIZE,
            "sessions": SESSIONS,
            "domains": DOMAINS,
            "elapsed_s": elapsed,
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "loadavg_at_end": load},
            "method": ("msgs/s = N / (N-th message at smtp-sink - first smtp-source started); CPU = the MTA's "
                       "process tree from its birth (root utime+stime+cutime+cstime + live descendants'), taken "
                       "once the MTA is idle, / N; medians over rounds"),
            "medians": [asdict(s) for s in summaries],
            "checks": [asdict(c) for c in result_checks],
            "results": [asdict(r) for r in runs],
        }
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    if not args.keep and args.workdir is None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    if failed or len(runs) < args.runs * len(mtas):
        return 1
    return 2 if any(c.ok is False for c in result_checks) else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main(sys.argv[1:]))
