#!/usr/bin/env python3
"""Run every fastmta benchmark, one after another, and summarise them in one table and one JSON.

The benchmarks (each also runs alone; see bench/README.md):

  smtp      bench_smtp.py      client/sink vs smtp-source/smtp-sink/aiosmtplib (issue 2), and
                               fastmta load (also --workers 2) vs smtp-source → smtp-sink (issue 7, item 1)
  core      bench_core.py      templating and DKIM signing (issue 3)
  engine    bench_engine.py    engine throughput and pool fairness (issue 4)
  spool     bench_spool.py     campaign through the durable queue, RSS, submit() latency (issue 6)
  throttle  bench_throttle.py  adaptive vs static throttling scenario (issue 5)
  send      bench_send.py      the whole `fastmta send` command vs Postfix draining its queue (issue 18)
  layers    bench_layers.py    `fastmta send`'s CPU by layer, against smtp-source -d (issue 18)

Each script runs as a child process (never two at once: they measure CPU and
throughput on the same cores) with ``--json`` into a results directory, its
output saved to a log file there, and is killed (its whole process group) if
it outlasts its timeout. Then one table: per benchmark its headline figures
and every check, PASS/FAIL/SKIP; and one JSON document with the machine
description and each script's own JSON embedded.

``--quick`` passes ``--quick`` (plus smaller sizes where needed) to every
script so that the suite finishes in under 2 minutes; its figures only show
that the benchmarks work. The throttle scenario runs in real time (about a
minute even with its own ``--quick``), so quick mode leaves it out unless
``--with-throttle`` (or ``--only throttle``) is given.

Usage:
  python bench/run_all.py --json bench/results.json      # the full suite (long: an hour or more)
  python bench/run_all.py --quick                        # smoke test, < 2 minutes, no throttle scenario
  python bench/run_all.py --quick --with-throttle        # ... with it (about 3 minutes)
  python bench/run_all.py --only smtp,core -v            # a subset, streaming each script's output

Exit status: 0 every script ran and every check passed; 1 a script failed
(crash, timeout, failed run, no JSON); 2 every script ran but a check failed.
"""

from __future__ import annotations

import argparse
import codecs
import datetime
import io
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

Doc = dict[str, Any]
Headline = list[tuple[str, str]]  # (figure, value)


# --------------------------------------------------------------------------
# Reading each script's JSON: headline figures and checks
# --------------------------------------------------------------------------


def _num(x: Any, spec: str) -> str:
    return "-" if not isinstance(x, int | float) else format(x, spec)


def _size(n: int) -> str:
    return f"{n // 1024} KB" if n % 1024 == 0 else f"{n} B"


def smtp_headline(doc: Doc) -> Headline:
    """Every client → server pair at the acceptance cell (2 KB, 10 connections, or the nearest measured)."""
    results: list[Doc] = doc["results"]
    if not results:
        return []
    sizes = {r["size"] for r in results}
    size = 2048 if 2048 in sizes else min(sizes)
    conns = max(r["connections"] for r in results)
    out = []
    for r in results:
        if r["size"] != size or r["connections"] != conns:
            continue
        client = r["client"] if r.get("workers", 1) == 1 else f"{r['client']} --workers {r['workers']}"
        out.append((
            f"{client} → {r['server']}, {_size(size)}, {conns} conn",
            (f"{_num(r['messages_per_s'], ',.0f')} msgs/s, client {_num(r['client_cpu_us_per_message'], '.1f')} "
             f"µs/msg, server {_num(r['server_cpu_us_per_message'], '.1f')} µs/msg"),
        ))
    return out


def core_headline(doc: Doc) -> Headline:
    render, sign, canon = doc["render_us"], doc["sign_us"], doc["canon_mb_s"]
    fast, jinja = render.get("fastmta (_core)"), render.get("Jinja2 (autoescape)")
    out = [(
        "render one recipient (20 KB HTML, 10 fields)",
        f"fastmta {_num(fast, '.2f')} µs, Jinja2 {_num(jinja, '.2f')} µs"
        + (f" ({jinja / fast:.1f}x)" if isinstance(fast, float) and isinstance(jinja, float) and fast > 0 else ""),
    )]
    for algo in ("RSA-2048", "Ed25519"):
        out.append((
            f"DKIM sign 4 KB, {algo}",
            (f"fastmta {_num(sign.get(f'{algo} 4 KB fastmta'), '.1f')} µs, raw OpenSSL "
             f"{_num(sign.get(f'{algo} 4 KB raw OpenSSL'), '.1f')} µs, dkimpy {_num(sign.get(f'{algo} 4 KB dkimpy'), '.1f')} µs"),
        ))
    out.append(("relaxed canonicalization + SHA-256, 100 KB", f"{_num(canon.get('relaxed fastmta (_core)'), ',.0f')} MB/s"))
    if not doc.get("compiled", True):
        out.append(("compiled core", "NOT in use (figures are the pure-Python fallback)"))
    return out


def engine_headline(doc: Doc) -> Headline:
    out = []
    if doc.get("throughput"):
        t = doc["throughput"]
        for kind, m in t["medians"].items():
            rss = m.get("maxrss_mib")
            out.append((
                f"{kind} → smtp-sink ({t['recipients']:,} recipients, {t['message_bytes']} B signed)",
                f"{_num(m['messages_per_s'], ',.0f')} msgs/s, sender {_num(m['cpu_us_per_message'], '.1f')} µs/msg"
                + (f", peak RSS {rss:.0f} MiB" if isinstance(rss, int | float) else ""),
            ))
    if doc.get("fairness"):
        f = doc["fairness"]
        ratio = f.get("ratio")
        out.append((
            f"fairness: fast site with / without a tarpit site ({f['messages']:,} msgs)",
            (f"{_num(f['median_with_tarpit_messages_per_s'], ',.0f')} / {_num(f['median_alone_messages_per_s'], ',.0f')} "
             f"msgs/s = {_num(None if ratio is None else 100 * ratio, '.1f')}%"),
        ))
    return out


def spool_headline(doc: Doc) -> Headline:
    out = []
    c = doc.get("campaign")
    if c:
        out.append((
            f"campaign: fastmta send → smtp-sink ({c['recipients']:,} recipients)",
            (f"{_num(c['msgs_per_s'], ',.0f')} msgs/s, peak RSS {c['maxrss_bytes'] / 1e6:,.1f} MB, "
             f"queue disk peak {c['disk_peak'] / 1e6:,.1f} MB"),
        ))
    for r in doc.get("latency", []):
        lat = r["latencies_us"]
        out.append((
            f"submit() latency, {r['mode']['name']} ({r['mode']['producers']} producers)",
            (f"p50 {_num(lat.get('p50'), ',.0f')} µs, p99 {_num(lat.get('p99'), ',.0f')} µs, "
             f"{_num(r.get('submits_per_s'), ',.0f')} submits/s"),
        ))
    return out


def throttle_headline(doc: Doc) -> Headline:
    out = []
    for s in doc["sites"]:
        if s["site"] != "gmail":
            continue
        frac = s.get("goodput_fraction")
        out.append((
            f"{s['world']} throttle, gmail-like site",
            f"goodput {_num(None if frac is None else 100 * frac, '.0f')}% of allowed, "
            f"{_num(s.get('throttle_per_1000_steady'), '.1f')} throttle replies / 1000 (steady)"
            + (f", 80% of the raised limit after {s['reach_new_s']:.1f} s" if s.get("reach_new_s") is not None else ""),
        ))
    return out


def send_headline(doc: Doc) -> Headline:
    return [
        (f"{m['case']}: {m['n']:,} × {_size(m['message_bytes'])}",
         f"{_num(m['msgs_per_s'], ',.0f')} msgs/s, {_num(m['cpu_us_per_msg'], ',.1f')} µs/msg CPU")
        for m in doc.get("medians", [])
    ]


def layers_headline(doc: Doc) -> Headline:
    return [(f"{name} ({doc['n']:,} × 2 KB)", f"{_num(c['cpu_us_per_msg'], ',.1f')} µs/msg CPU")
            for name, c in doc.get("cases", {}).items()]


@dataclass(frozen=True, slots=True)
class Check:
    """One check of one benchmark, whatever shape its script's JSON gives it."""

    group: str  # e.g. "issue 2"
    name: str
    ok: bool | None  # None: not measured (SKIP)
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]


def normalise_check(group: str, raw: Doc) -> Check:
    """The scripts write checks as {name, ok, detail}, {name, passed, detail|value} or {criterion, value, op, limit, pass}."""
    name = str(raw.get("name") or raw.get("criterion") or "(unnamed check)")
    ok: bool | None = None
    for key in ("ok", "passed", "pass"):
        if key in raw:
            ok = None if raw[key] is None else bool(raw[key])
            break
    if "detail" in raw:
        detail = str(raw["detail"])
    elif "op" in raw and "limit" in raw:
        detail = f"{_num(raw.get('value'), '.2f')} (need {raw['op']} {raw['limit']:g})"
    else:
        detail = str(raw.get("value", ""))
    return Check(group, name, ok, detail)


# --------------------------------------------------------------------------
# The benchmarks
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Benchmark:
    name: str
    script: str
    what: str
    quick_args: tuple[str, ...]  # arguments in --quick mode (besides --json)
    full_args: tuple[str, ...]
    quick_timeout: float  # seconds
    full_timeout: float
    check_groups: tuple[tuple[str, str], ...]  # (key of a list of checks in the script's JSON, its label)
    headline: Callable[[Doc], Headline]
    in_quick: bool = True  # quick mode runs it unless asked not to
    check_failure_exit: int = 2  # the exit status the script uses when only a check failed
    extra_files: tuple[tuple[str, str], ...] = ()  # (option, file name in the results directory)


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "smtp", "bench_smtp.py", "SMTP client/sink vs smtp-source/smtp-sink/aiosmtplib (issues 2 and 7)",
        # Its own --quick: 3 rounds of 2000 messages, 2 sizes x 2 connection counts, --workers 2 row (~15 s).
        ("--quick",), (), 300, 3600,
        (("acceptance", "issue 2"), ("acceptance_issue7", "issue 7")), smtp_headline,
    ),
    Benchmark(
        "core", "bench_core.py", "templating, DKIM signing, canonicalization (issue 3)",
        ("--quick",), (), 120, 1800, (("acceptance", "issue 3"),), core_headline,
        check_failure_exit=1,  # bench_core exits 1 when a criterion fails
    ),
    Benchmark(
        "engine", "bench_engine.py", "engine campaign throughput and fairness under a tarpit (issue 4)",
        # Its own --quick (10,000 recipients, 3 rounds) takes about a minute: one smaller round instead.
        ("--quick", "--runs", "1", "--recipients", "3000", "--stock-messages", "3000", "--fair-messages", "3000"),
        (), 300, 7200, (("checks", "issue 4"),), engine_headline,
    ),
    Benchmark(
        "spool", "bench_spool.py", "campaign through the durable queue, RSS, submit() latency (issue 6)",
        ("--quick", "--recipients", "30000", "--submits", "5000", "--solo-submits", "500"),
        (), 300, 7200, (("checks", "issue 6"),), spool_headline,
    ),
    Benchmark(
        "throttle", "bench_throttle.py", "adaptive vs static throttling scenario, real time (issue 5)",
        # Real time: phases of 25 s + 35 s even in its own quick mode, too long for the 2-minute budget.
        ("--quick",), (), 240, 1200, (("checks", "issue 5"),), throttle_headline,
        in_quick=False, extra_files=(("--plot", "throttle.png"),),
    ),
    Benchmark(
        "send", "bench_send.py", "the whole fastmta send command vs Postfix draining its queue (issue 18)",
        # Its own --quick: 2,000 (rsa100k 500) messages, one round, ~15 s (Postfix needs root).
        ("--quick",), (), 300, 3600, (("checks", "issue 18"),), send_headline,
    ),
    Benchmark(
        "layers", "bench_layers.py", "fastmta send's CPU by layer against smtp-source -d (issue 18)",
        ("--quick",), (), 120, 1800, (), layers_headline,
    ),
)
BY_NAME = {b.name: b for b in BENCHMARKS}


# --------------------------------------------------------------------------
# Running one script
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    name: str
    command: list[str]
    log: str
    json_path: str
    timeout_s: float
    wall_s: float = 0.0
    exit_code: int | None = None
    timed_out: bool = False
    problems: list[str] = field(default_factory=list)  # why the run counts as failed
    doc: Doc | None = None
    headline: Headline = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def run_failed(self) -> bool:
        return bool(self.problems)

    @property
    def checks_failed(self) -> bool:
        return any(c.ok is False for c in self.checks)

    @property
    def status(self) -> str:
        if self.run_failed:
            return "FAILED"
        return "CHECK FAILED" if self.checks_failed else "ok"


def _stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop a script and everything it started (its own process group): SIGINT, then SIGTERM, then SIGKILL.

    SIGINT first so that the script's ``finally`` blocks and context managers
    stop the servers they started; whatever is left gets the harder signals.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        proc.wait(5.0)


def _kill_leftovers(pgid: int) -> None:
    """SIGKILL whatever a finished script left behind in its process group (a server it failed to stop)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is empty: the normal case


def run_script(bench: Benchmark, args: list[str], results_dir: Path, timeout: float, echo: TextIO | None) -> Outcome:
    json_path = results_dir / f"{bench.name}.json"
    log_path = results_dir / f"{bench.name}.log"
    extra = [a for option, fname in bench.extra_files for a in (option, str(results_dir / fname))]
    cmd = [sys.executable, str(BENCH_DIR / bench.script), *args, *extra, "--json", str(json_path)]
    out = Outcome(bench.name, cmd, str(log_path), str(json_path), timeout)
    json_path.unlink(missing_ok=True)  # a JSON left from an earlier run must not pass for this one's
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        # A new session: the script and every server it starts share one process
        # group, which is what we kill on timeout or interruption.
        proc = subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        assert isinstance(proc.stdout, io.BufferedReader)
        stdout = proc.stdout

        def pump() -> None:
            # Drain the output for the script's whole life (a full pipe would stall it).
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks may split a character
            for chunk in iter(lambda: stdout.read1(65536), b""):
                log.write(chunk)
                if echo is not None:
                    echo.write(decoder.decode(chunk))
                    echo.flush()

        reader = threading.Thread(target=pump, name=f"{bench.name}-output", daemon=True)
        reader.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            out.timed_out = True
            _stop_group(proc)
        except BaseException:  # KeyboardInterrupt: never leave a benchmark running behind us
            _stop_group(proc)
            raise
        finally:
            _kill_leftovers(proc.pid)
            reader.join(10.0)
            stdout.close()
    out.wall_s = time.monotonic() - started
    out.exit_code = proc.returncode
    interpret(bench, out)
    return out


def interpret(bench: Benchmark, out: Outcome) -> None:
    """Read the script's JSON and decide whether the run failed, from its exit status and its checks."""
    if out.timed_out:
        out.problems.append(f"timed out after {out.timeout_s:g} s and was killed")
    try:
        out.doc = json.loads(Path(out.json_path).read_text())
    except FileNotFoundError:
        out.problems.append("wrote no JSON")
    except ValueError as exc:
        out.problems.append(f"unreadable JSON: {exc}")
    if out.doc is not None:
        for key, group in bench.check_groups:
            raw = out.doc.get(key)
            if isinstance(raw, list):
                out.checks += [normalise_check(group, c) for c in raw if isinstance(c, dict)]
            elif raw is not None or key != "acceptance_issue7":
                out.problems.append(f"no '{key}' list of checks in its JSON")
        try:
            out.headline = bench.headline(out.doc)
        except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
            out.headline = [("(headline figures)", f"not found in its JSON: {type(exc).__name__}: {exc}")]
    code = out.exit_code
    if out.timed_out or code is None:
        return
    if code == bench.check_failure_exit and out.checks_failed:
        return  # only checks failed: shown with them
    if code == 0:
        if out.checks_failed:
            out.problems.append("exit 0 although its JSON has a failed check")
        return
    if code == 2 and bench.check_failure_exit == 2:
        out.problems.append("exit 2 (a check failed) but its JSON has no failed check")
    elif code == 1:
        out.problems.append("exit 1: a run failed (see its log)")
    elif code < 0:
        out.problems.append(f"killed by signal {-code}")
    else:
        out.problems.append(f"exit {code}")


# --------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> Doc:
    """CPU model, cores, memory, kernel, Python: what the figures came from."""
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith(("model name", "Hardware", "cpu model"))), platform.processor() or "unknown")
    mhz = [float(line.split(":", 1)[1]) for line in cpuinfo.splitlines() if line.startswith("cpu MHz")]
    cores: set[tuple[str, str]] = set()
    physical = core = ""
    for line in cpuinfo.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip() and core:
            cores.add((physical, core))
            physical = core = ""
    meminfo = {line.split(":")[0]: line.split(":")[1].strip() for line in _read("/proc/meminfo").splitlines() if ":" in line}

    def kib(key: str) -> int | None:
        value = meminfo.get(key, "").split()
        return int(value[0]) * 1024 if value and value[0].isdigit() else None

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    uname = platform.uname()
    return {
        "cpu_model": model,
        "cpu_mhz": round(max(mhz)) if mhz else None,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": len(cores) or None,
        "memory_bytes": kib("MemTotal"),
        "memory_available_bytes": kib("MemAvailable"),
        "kernel": f"{uname.system} {uname.release}",
        "kernel_version": uname.version,
        "arch": uname.machine,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "loadavg_at_start": list(os.getloadavg()),
    }


def git_state() -> Doc:
    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", *argv], check=False, cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def describe(m: Doc) -> str:
    mem = m["memory_bytes"]
    return (f"{m['cpu_model']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable"
            + (f", {m['physical_cores']} cores" if m["physical_cores"] else "") + "), "
            + (f"{mem / 2**30:.1f} GiB RAM, " if mem else "")
            + f"{m['kernel']}, {m['python']}; load average {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}")


# --------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------


def summary_table(outcomes: Sequence[Outcome]) -> str:
    """One table: per benchmark its run status, headline figures and every check."""
    rows: list[tuple[str, str, str]] = []
    for o in outcomes:
        status = f"{o.status} in {o.wall_s:.0f} s (exit {o.exit_code}"
        status += ", timed out)" if o.timed_out else ")"
        rows.append((o.name, "run", status))
        rows += [("", "  problem", p) for p in o.problems]
        rows += [("", figure, value) for figure, value in o.headline]
        rows += [("", f"{c.verdict}  {c.group}: {c.name}", c.detail) for c in o.checks]
        rows.append(("", "", ""))
    rows = rows[:-1]
    head = ("benchmark", "figure / check", "result")
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(2)]

    def line(cells: Sequence[str]) -> str:
        return f"{cells[0].ljust(widths[0])}  {cells[1].ljust(widths[1])}  {cells[2]}".rstrip()

    return "\n".join([line(head), line(("-" * widths[0], "-" * widths[1], "-" * 6)), *(line(r) for r in rows)])


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test of every benchmark, < 2 minutes (the throttle scenario only with --with-throttle)")
    p.add_argument("--only", metavar="NAME[,NAME]", help=f"run only these: {', '.join(BY_NAME)}")
    p.add_argument("--with-throttle", action="store_true", help="--quick: include the throttle scenario (~70 s more)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="kill a script that runs longer than this (default per script: "
                        + ", ".join(f"{b.name} {b.quick_timeout:g}/{b.full_timeout:g}" for b in BENCHMARKS)
                        + " s quick/full)")
    p.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                   help="extra arguments for one script, e.g. --args 'smtp=--runs 7' (repeatable)")
    p.add_argument("--results-dir", type=Path, metavar="DIR",
                   help="where each script's JSON and log go (default: a new directory under /tmp)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the combined JSON here too")
    p.add_argument("--verbose", "-v", action="store_true", help="stream each script's output (always saved to its log)")
    p.add_argument("--list", action="store_true", help="print the commands that would run, and exit")
    args = p.parse_args(argv)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BY_NAME]
        if unknown or not names:
            p.error(f"--only: unknown benchmark(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(BY_NAME)}")
        args.selected = [b for b in BENCHMARKS if b.name in names]
    else:
        args.selected = [b for b in BENCHMARKS if not args.quick or b.in_quick or args.with_throttle]
    args.extra = {}
    for item in args.args:
        name, sep, rest = item.partition("=")
        if not sep or name not in BY_NAME:
            p.error(f"--args expects NAME=ARGS with NAME one of {', '.join(BY_NAME)}, got {item!r}")
        args.extra[name] = args.extra.get(name, []) + shlex.split(rest)
    if args.timeout is not None and args.timeout <= 0:
        p.error("--timeout must be positive")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    plan = [(b, [*(b.quick_args if args.quick else b.full_args), *args.extra.get(b.name, [])],
             args.timeout or (b.quick_timeout if args.quick else b.full_timeout)) for b in args.selected]
    if args.list:
        for b, script_args, timeout in plan:
            extra = "".join(f" {option} DIR/{fname}" for option, fname in b.extra_files)
            print(f"{b.name:9} (timeout {timeout:g} s)  python bench/{b.script} {shlex.join(script_args)}{extra} "
                  f"--json DIR/{b.name}.json")
        skipped = [b.name for b in BENCHMARKS if b not in args.selected]
        if skipped:
            print(f"not selected: {', '.join(skipped)}")
        return 0

    results_dir = args.results_dir or Path(tempfile.mkdtemp(prefix="fastmta-bench-"))
    results_dir.mkdir(parents=True, exist_ok=True)
    mach = machine()
    started_at = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    print(f"machine: {describe(mach)}")
    print(f"results: {results_dir}" + ("  [--quick: figures are indicative only]" if args.quick else ""), flush=True)
    outcomes: list[Outcome] = []
    for i, (bench, script_args, timeout) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {bench.name}: {bench.what} ...", flush=True)
        out = run_script(bench, script_args, results_dir, timeout, sys.stdout if args.verbose else None)
        outcomes.append(out)
        counts = {v: sum(c.verdict == v for c in out.checks) for v in ("PASS", "FAIL", "SKIP")}
        print(f"[{i}/{len(plan)}] {bench.name}: {out.status} in {out.wall_s:.1f} s (exit {out.exit_code}); checks "
              + (", ".join(f"{n} {v}" for v, n in counts.items() if n) or "none read") + f"; log {out.log}", flush=True)
    wall = time.monotonic() - started

    print()
    print(summary_table(outcomes))
    print()
    not_run = [b.name for b in BENCHMARKS if b not in args.selected]
    print(f"{len(outcomes)} benchmark(s) in {wall:.0f} s"
          + (f"; not run: {', '.join(not_run)}" if not_run else "")
          + ("  [--quick: figures only show that the benchmarks work]" if args.quick else ""))

    exit_status = 1 if any(o.run_failed for o in outcomes) else 2 if any(o.checks_failed for o in outcomes) else 0
    doc = {
        "suite": "fastmta bench/run_all.py",
        "argv": [sys.executable, *sys.argv],
        "quick": args.quick,
        "started_utc": started_at.isoformat(timespec="seconds"),
        "wall_s": round(wall, 1),
        "machine": {**mach, "loadavg_at_end": list(os.getloadavg())},
        "git": git_state(),
        "results_dir": str(results_dir),
        "not_run": not_run,
        "exit_status": exit_status,
        "benchmarks": {
            o.name: {
                "command": o.command, "exit_code": o.exit_code, "timed_out": o.timed_out, "timeout_s": o.timeout_s,
                "wall_s": round(o.wall_s, 1), "status": o.status, "problems": o.problems, "log": o.log,
                "headline": [{"figure": f, "value": v} for f, v in o.headline],
                "checks": [{**asdict(c), "verdict": c.verdict} for c in o.checks],
                "result": o.doc,
            }
            for o in outcomes
        },
    }
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    (results_dir / "summary.json").write_text(text)
    if args.json:
        args.json.write_text(text)
    print(f"combined JSON: {results_dir / 'summary.json'}" + (f" and {args.json}" if args.json else ""))
    return exit_status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
