#!/usr/bin/env python3
"""Engine benchmark: a DKIM-signed campaign delivered to smtp-sink, and pool fairness under a tarpit.

Issue 4, acceptance item 4 (and the fairness figure of item 3), in one run,
everything on loopback:

1. Throughput. A campaign job (TOML + template + recipients CSV + Ed25519
   DKIM key, written to a temporary directory) of N recipients (default
   100,000) over 100 domains, each message ~2 KB after rendering and
   signing, is loaded with ``fastmta.intake.campaign.Campaign`` and every
   recipient's message is submitted to ``fastmta.delivery.engine.Engine``, which
   delivers it through a static route (``"*" -> smtp-sink``) with TLS off.
   Beside it, in the same rounds, Postfix's ``smtp-source`` sends the same
   message (the campaign's first rendered and signed one) to the same
   ``smtp-sink`` with the same number of connections, with connection
   reuse (``-d``) and stock (one message per session).

   The engine runs in a child process of this script (``engine-child``), so
   its peak RSS (``ru_maxrss``) is its own. The child measures itself with
   ``getrusage(RUSAGE_SELF)`` (all threads) around two phases over the same
   rows: the delivery (submit every rendered+signed message, then drain)
   and, afterwards, a read+render+sign-only pass that delivers nothing. The
   difference is the engine's own share (queueing, routing, SMTP).

2. Fairness. Two ``fastmta sink`` processes reached by static routes: a fast
   one and a tarpit (``--delay mail:5`` by default). The engine (a child
   process, ``fairness-child``) delivers the same number of messages to the
   fast site alone, then interleaved with messages to the tarpit site. The
   fast site's rate with the tarpit must stay >= 90% of its rate without.

Reported: medians over ``--runs`` rounds; each round runs every
configuration once (interleaved, so a change in machine load hits all
alike). Exit status: 0 all runs complete and every check passes, 1 some run
failed, 2 every run completed but a check failed.

Usage:
  python bench/bench_engine.py                      # full: 100,000 recipients, 5 rounds
  python bench/bench_engine.py --quick              # smoke test: 10,000 recipients, 3 rounds
  python bench/bench_engine.py --runs 3 --json bench/engine-results.json
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (
    Server,
    fastmta_sink,
    find_tool,
    postfix_smtp_sink,
    run_child,
    text_table,
)

REPO = Path(__file__).resolve().parent.parent
TEST_KEY = REPO / "src" / "fastmta" / "examples" / "spool" / "dkim-test-ed25519.key.pem"  # a public TEST key

SENDER = "bounces@news.bench.example"
DKIM_DOMAIN = "news.bench.example"
HELO = "bench.fastmta.test"
DOMAINS = 100
FAST_DOMAIN = "fast.bench.example"
TARPIT_DOMAIN = "tarpit.bench.example"

ENGINE = "fastmta engine (campaign)"
SOURCE_REUSE = "smtp-source -d"
SOURCE_STOCK = "smtp-source (stock)"
GOAL_CPU_US = 200.0
GOAL_FAIRNESS = 0.90

Log = Callable[[str], None]


def _cpu_self() -> float:
    """User + system CPU seconds of this process, all threads included."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _maxrss_kib() -> int:
    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# --------------------------------------------------------------------------
# The campaign job, written to a temporary directory
# --------------------------------------------------------------------------

_FIRST_NAMES = ("Ada", "Grace", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Niklaus", "Margaret")
_FILLER_WORDS = (
    "delivery", "throughput", "connection", "pipelining", "signature", "template", "recipient", "campaign",
    "transaction", "mailbox", "envelope", "loopback",
)


def _filler(chars: int) -> str:
    """About *chars* characters of plain ASCII prose in lines of at most 72 characters.

    Short ASCII lines keep the text part 7bit (no quoted-printable), as a
    typical campaign's text part is. No line starts with a dot, so the
    message smtp-source sends from a file needs no dot-stuffing either.
    """
    lines: list[str] = []
    current: list[str] = []
    length = 0
    total = 0
    i = 0
    while total < chars:
        word = _FILLER_WORDS[i % len(_FILLER_WORDS)]
        i += 1
        if length + len(word) + 1 > 72:
            lines.append(" ".join(current))
            total += length + 1
            current, length = [], 0
        current.append(word)
        length += len(word) + (1 if length else 0)
    if current:
        lines.append(" ".join(current))
    return "\n".join(lines)[: max(chars, 0)].rstrip()


def _write_template(directory: Path, filler_chars: int) -> None:
    (directory / "bench.txt").write_text(
        "Hello {{ first_name }},\n\n"
        "your account {{ id }} is ready. Everything you need is at\n"
        "https://news.bench.example/start?id={{ id | urlencode }}\n\n"
        f"{_filler(filler_chars)}\n\n"
        "-- \nThe fastmta bench\n",
        encoding="ascii",
    )


def _write_job(directory: Path) -> Path:
    job = directory / "bench.toml"
    job.write_text(
        "# Written by bench/bench_engine.py; the DKIM key is a public TEST key.\n"
        "[campaign]\n"
        'id = "bench-engine"\n'
        f'sender = "{SENDER}"\n'
        'recipients = "recipients.csv"\n\n'
        "[[dkim]]\n"
        f'domain = "{DKIM_DOMAIN}"\n'
        'selector = "bench"\n'
        'key_path = "dkim-test-ed25519.key.pem"\n'
        'algorithm = "ed25519-sha256"\n\n'
        "[template]\n"
        'text_file = "bench.txt"\n\n'
        "[template.headers]\n"
        f'From = "fastmta bench <news@{DKIM_DOMAIN}>"\n'
        'To = "{{ first_name }} <{{ email }}>"\n'
        'Subject = "Your account {{ id }} is ready, {{ first_name }}"\n'
        f'List-Unsubscribe = "<https://{DKIM_DOMAIN}/unsubscribe?id={{{{ id | urlencode }}}}>"\n'
        'List-Unsubscribe-Post = "List-Unsubscribe=One-Click"\n',
        encoding="utf-8",
    )
    return job


def _write_recipients(path: Path, count: int) -> None:
    # Consecutive rows cycle through the domains, as a real list sorted by
    # signup time would mix them.
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("email", "first_name", "id"))
        for i in range(count):
            w.writerow((f"user{i}@d{i % DOMAINS:03d}.bench.example", _FIRST_NAMES[i % len(_FIRST_NAMES)], f"u{i:07d}"))


def _first_message(job: Path) -> bytes:
    """The first recipient's rendered and signed message, exactly as the engine would get it."""
    from fastmta.intake.campaign import Campaign
    from fastmta.intake.reader import SpoolItem

    for item in Campaign.load(job).items():
        if isinstance(item, SpoolItem):
            return item.content
        raise RuntimeError(f"the benchmark campaign rejected its first row: {item}")
    raise RuntimeError("the benchmark campaign has no rows")


@dataclass(frozen=True, slots=True)
class CampaignFiles:
    job: Path
    sample: bytes  # the first rendered + signed message


def build_campaign(directory: Path, recipients: int, size: int) -> CampaignFiles:
    """Write a campaign job whose rendered, signed messages are about *size* bytes."""
    shutil.copyfile(TEST_KEY, directory / "dkim-test-ed25519.key.pem")
    _write_recipients(directory / "recipients.csv", recipients)
    job = _write_job(directory)
    # The headers, the DKIM signature and the MIME framing take a few hundred
    # bytes that depend on the row; pad the text part until the whole message
    # is the requested size. Each round corrects by the remaining difference
    # (line breaks move a little as the filler grows), so it converges fast.
    filler = max(size - 900, 0)
    sample = b""
    for _attempt in range(8):
        _write_template(directory, filler)
        sample = _first_message(job)
        gap = size - len(sample)
        if abs(gap) <= 8 or filler + gap < 0:
            break
        filler += gap
    return CampaignFiles(job, sample)


# --------------------------------------------------------------------------
# Child processes: the engine under measurement
# --------------------------------------------------------------------------


async def _deliver_campaign(job: Path, target: str, connections: int, max_queued: int | None,
                            timeout: float) -> dict[str, Any]:
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine
    from fastmta.intake.campaign import Campaign
    from fastmta.intake.reader import Reject

    campaign = Campaign.load(job)
    queue: dict[str, Any] = {} if max_queued is None else {"max_queued_recipients": max_queued}
    config = config_from_dict({
        "routing": {"static": {"*": [target]}},
        "smtp": {"tls": "never"},
        # A local smtp-sink is not a receiver to be polite to: no adaptive slow
        # start (it measures the engine's cost, not the throttle's caution).
        "sites": {"*": {"max_connections": connections, "adaptive": {"enabled": False}}},
        "queue": queue,
    })
    rss_before = _maxrss_kib()
    submitted = rejected = 0
    cpu0 = _cpu_self()
    t0 = time.perf_counter()
    async with Engine(config) as engine:
        # The same loop `fastmta send` runs over a campaign: one message per
        # recipient, rendered and signed as the rows stream in, each submitted
        # with its envelope; submit() waits only when the queue is full.
        for item in campaign.items():
            if isinstance(item, Reject):
                rejected += 1
                continue
            await engine.submit(item.content, item.sender, item.recipients)
            submitted += 1
        submit_s = time.perf_counter() - t0
        drained = await engine.drain(timeout)
        wall = time.perf_counter() - t0
        cpu = _cpu_self() - cpu0
        stats = engine.queue_stats()
        counts = dict(engine.counts)
        unfinished = engine.unfinished
    rss_peak = _maxrss_kib()

    # Read + render + sign only, over the same rows: what the campaign costs
    # without the engine. Run after the delivery so it cannot raise the peak
    # RSS reported above, and with warm caches as the delivery had for most rows.
    cpu1 = _cpu_self()
    t1 = time.perf_counter()
    rendered = 0
    rendered_bytes = 0
    for item in Campaign.load(job).items():
        if not isinstance(item, Reject):
            rendered += 1
            rendered_bytes += len(item.content)
    render_wall = time.perf_counter() - t1
    render_cpu = _cpu_self() - cpu1

    return {
        "submitted": submitted, "rejected": rejected, "drained": drained, "unfinished": unfinished,
        "counts": counts, "submit_s": submit_s, "deliver_wall_s": wall, "deliver_cpu_s": cpu,
        "render_count": rendered, "render_bytes": rendered_bytes, "render_wall_s": render_wall,
        "render_cpu_s": render_cpu, "maxrss_before_kib": rss_before, "maxrss_kib": rss_peak,
        "connections_opened": sum(s["connections_opened"] for s in stats),
        "transactions": sum(s["transactions"] for s in stats),
        "max_connections_seen": max((s["max_connections_seen"] for s in stats), default=0),
    }


async def _fairness(fast: str, tarpit: str, messages: int, tarpit_every: int, size: int, connections: int,
                    timeout: float) -> dict[str, Any]:
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine, Status
    from fastmta.load.workload import make_message
    from fastmta.queue.records import Outcome

    config = config_from_dict({
        "routing": {"static": {FAST_DOMAIN: [fast], TARPIT_DOMAIN: [tarpit]}},
        "smtp": {"tls": "never"},
        "sites": {"*": {"max_connections": connections, "adaptive": {"enabled": False}}},
    })
    message = make_message(size, SENDER, f"rcpt@{FAST_DOMAIN}")
    engine = Engine(config)
    await engine.start()
    tarpit_sent = 0
    results: list[asyncio.Future[list[Outcome]]] = []
    try:
        t0 = time.perf_counter()
        for i in range(messages):
            if tarpit_every and i % tarpit_every == 0:
                await engine.submit(message, SENDER, [f"t{i}@{TARPIT_DOMAIN}"])
                tarpit_sent += 1
            message_id = await engine.submit(message, SENDER, [f"u{i}@{FAST_DOMAIN}"])
            # Nothing awaited since submit() returned, so the message cannot have
            # finished (and been forgotten by the engine) yet.
            results.append(engine.result(message_id))
        done, pending = await asyncio.wait(results, timeout=timeout)
        wall = time.perf_counter() - t0
        delivered = sum(
            1 for f in done
            if f.exception() is None and all(o.status is Status.DELIVERED for o in f.result())
        )
        tarpit_delivered = engine.counts.get("delivered", 0) - delivered
    finally:
        # The tarpit's transactions never finish in time: bounded close, and
        # whatever is left is abandoned with the process.
        closing = time.perf_counter()
        await engine.close(timeout=1.0)
        close_s = time.perf_counter() - closing
    return {
        "fast_messages": messages, "fast_delivered": delivered, "fast_pending": len(pending),
        "tarpit_messages": tarpit_sent, "tarpit_delivered": tarpit_delivered, "wall_s": wall,
        "close_s": close_s,
    }


def engine_child(argv: list[str]) -> int:
    import uvloop

    p = argparse.ArgumentParser(prog="bench_engine.py engine-child")
    p.add_argument("job", type=Path)
    p.add_argument("target")
    p.add_argument("--connections", type=int, required=True)
    p.add_argument("--max-queued", type=int, default=None)
    p.add_argument("--timeout", type=float, required=True)
    a = p.parse_args(argv)
    report = uvloop.run(_deliver_campaign(a.job, a.target, a.connections, a.max_queued, a.timeout))
    print(json.dumps(report))
    return 0


def fairness_child(argv: list[str]) -> int:
    import uvloop

    p = argparse.ArgumentParser(prog="bench_engine.py fairness-child")
    p.add_argument("fast")
    p.add_argument("tarpit")
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--tarpit-every", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--connections", type=int, required=True)
    p.add_argument("--timeout", type=float, required=True)
    a = p.parse_args(argv)
    report = uvloop.run(_fairness(a.fast, a.tarpit, a.messages, a.tarpit_every, a.size, a.connections, a.timeout))
    print(json.dumps(report))
    sys.stdout.flush()
    # Tarpit connections cancelled at close may still hold transports; exiting
    # at once keeps the child's lifetime bounded whatever they do.
    os._exit(0)


# --------------------------------------------------------------------------
# The parent: rounds, samples, medians
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Samples:
    """Per-run figures of one configuration; each list gets one entry per successful run."""

    messages_per_s: list[float] = field(default_factory=list)
    cpu_us_per_message: list[float] = field(default_factory=list)  # the sending process
    sink_cpu_us_per_message: list[float] = field(default_factory=list)
    render_cpu_us_per_message: list[float] = field(default_factory=list)  # engine only
    maxrss_mib: list[float] = field(default_factory=list)  # engine only
    raw: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _problem(run_timed_out: bool, returncode: int, stderr: bytes) -> str | None:
    if run_timed_out:
        return "timed out"
    if returncode != 0:
        lines = [ln for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
        return f"exit {returncode}: {lines[-1].strip()[:300] if lines else 'no message'}"
    return None


def _json_report(stdout: bytes) -> dict[str, Any] | None:
    try:
        report = json.loads(stdout.decode(errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return report if isinstance(report, dict) else None


@dataclass(slots=True)
class Throughput:
    job: Path
    message_file: str
    recipients: int
    stock_messages: int
    connections: int
    max_queued: int | None
    run_timeout: float
    sink: Server
    samples: dict[str, Samples] = field(default_factory=lambda: {k: Samples() for k in (ENGINE, SOURCE_REUSE, SOURCE_STOCK)})

    def run_engine(self) -> str | None:
        s = self.samples[ENGINE]
        cmd = [sys.executable, str(Path(__file__).resolve()), "engine-child", str(self.job), self.sink.target,
               "--connections", str(self.connections), "--timeout", str(self.run_timeout)]
        if self.max_queued is not None:
            cmd += ["--max-queued", str(self.max_queued)]
        sink_cpu0 = self.sink.cpu_seconds()
        run = run_child(cmd, timeout=self.run_timeout + 60.0)
        sink_cpu = self.sink.cpu_seconds() - sink_cpu0
        problem = _problem(run.timed_out, run.returncode, run.stderr)
        report = _json_report(run.stdout) if problem is None else None
        if problem is None and report is None:
            problem = f"unreadable output: {run.stdout[-200:]!r}"
        if report is not None:
            delivered = report["counts"].get("delivered", 0)
            if delivered != self.recipients or report["rejected"]:
                problem = (f"{delivered} of {self.recipients} delivered, {report['rejected']} rejected, "
                           f"counts {report['counts']}")
        if problem is not None or report is None:
            s.failures.append(problem or "no report")
            return problem
        n = self.recipients
        s.messages_per_s.append(n / report["deliver_wall_s"])
        s.cpu_us_per_message.append(report["deliver_cpu_s"] * 1e6 / n)
        s.render_cpu_us_per_message.append(report["render_cpu_s"] * 1e6 / n)
        s.sink_cpu_us_per_message.append(sink_cpu * 1e6 / n)
        s.maxrss_mib.append(report["maxrss_kib"] / 1024)
        report["child_wall_s"] = run.wall_s
        report["child_cpu_s"] = run.cpu_s  # the whole child: start-up, both passes, shutdown
        s.raw.append(report)
        return None

    def run_source(self, kind: str) -> str | None:
        s = self.samples[kind]
        messages = self.recipients if kind == SOURCE_REUSE else self.stock_messages
        reuse = ["-d"] if kind == SOURCE_REUSE else []
        # -F sends the campaign's first message; smtp-source appends CRLF to
        # each line of the file itself, so the file holds bare LFs. -m is the
        # total over all -s sessions.
        cmd = [find_tool("smtp-source"), *reuse, "-s", str(self.connections), "-m", str(messages),
               "-f", SENDER, "-t", "user0@d000.bench.example", "-M", HELO, "-F", self.message_file,
               self.sink.target]
        sink_cpu0 = self.sink.cpu_seconds()
        run = run_child(cmd, timeout=self.run_timeout)
        sink_cpu = self.sink.cpu_seconds() - sink_cpu0
        # smtp-source exits non-zero on any reply that is not 2xx/3xx as expected.
        problem = _problem(run.timed_out, run.returncode, run.stderr)
        if problem is not None:
            s.failures.append(problem)
            return problem
        # smtp-source starts in ~1 ms: its whole-run figures are its steady state.
        s.messages_per_s.append(messages / run.wall_s)
        s.cpu_us_per_message.append(run.cpu_s * 1e6 / messages)
        s.sink_cpu_us_per_message.append(sink_cpu * 1e6 / messages)
        s.raw.append({"messages": messages, "wall_s": run.wall_s, "cpu_s": run.cpu_s, "sink_cpu_s": sink_cpu})
        return None


@dataclass(slots=True)
class Fairness:
    messages: int
    tarpit_every: int
    size: int
    connections: int
    run_timeout: float
    fast: Server
    tarpit: Server
    alone: Samples = field(default_factory=Samples)
    with_tarpit: Samples = field(default_factory=Samples)
    # One entry per round and scenario, None for a failed run, so the two
    # scenarios of one round can be paired (same machine load, roughly).
    by_round: dict[bool, list[float | None]] = field(default_factory=lambda: {False: [], True: []})

    def run(self, with_tarpit: bool) -> str | None:
        s = self.with_tarpit if with_tarpit else self.alone
        cmd = [sys.executable, str(Path(__file__).resolve()), "fairness-child", self.fast.target, self.tarpit.target,
               "--messages", str(self.messages), "--tarpit-every", str(self.tarpit_every if with_tarpit else 0),
               "--size", str(self.size), "--connections", str(self.connections), "--timeout", str(self.run_timeout)]
        run = run_child(cmd, timeout=self.run_timeout + 60.0)
        problem = _problem(run.timed_out, run.returncode, run.stderr)
        report = _json_report(run.stdout) if problem is None else None
        if problem is None and report is None:
            problem = f"unreadable output: {run.stdout[-200:]!r}"
        if report is not None and report["fast_delivered"] != self.messages:
            problem = f"{report['fast_delivered']} of {self.messages} delivered to the fast site in time"
        if problem is not None or report is None:
            s.failures.append(problem or "no report")
            self.by_round[with_tarpit].append(None)
            return problem
        rate = self.messages / report["wall_s"]
        s.messages_per_s.append(rate)
        s.raw.append(report)
        self.by_round[with_tarpit].append(rate)
        return None

    def round_ratios(self) -> list[float]:
        return [w / a for a, w in zip(self.by_round[False], self.by_round[True]) if a and w is not None]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool | None  # None: not measured
    detail: str

    def line(self) -> str:
        return f"{({True: 'PASS', False: 'FAIL', None: 'SKIP'})[self.ok]}  {self.name}: {self.detail}"


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipients", type=int, default=None,
                   help="campaign recipients per engine run (default 100000, --quick 10000)")
    p.add_argument("--runs", type=int, default=None, help="rounds (default 5, --quick 3); medians are reported")
    p.add_argument("--quick", action="store_true", help="smaller runs: checks that the benchmark works")
    p.add_argument("--size", type=int, default=2048, help="message size in bytes after signing (default 2048)")
    p.add_argument("--connections", type=int, default=10,
                   help="engine connections per site and smtp-source sessions (default 10, the engine's default)")
    p.add_argument("--stock-messages", type=int, default=None,
                   help="messages per stock smtp-source run (default min(recipients, 10000)): one TCP "
                        "connection each, and every one leaves a socket in TIME_WAIT")
    p.add_argument("--max-queued", type=int, default=None,
                   help="engine queue.max_queued_recipients (default: the engine's default)")
    p.add_argument("--fair-messages", type=int, default=None,
                   help="messages to the fast site per fairness run (default 20000, --quick 10000)")
    p.add_argument("--tarpit-every", type=int, default=10,
                   help="with the tarpit: one tarpit message before every Nth fast message (default 10)")
    p.add_argument("--tarpit-delay", default="mail:5",
                   help="the tarpit sink's --delay PHASE:SECONDS (default mail:5)")
    p.add_argument("--skip-throughput", action="store_true", help="only the fairness part")
    p.add_argument("--skip-fairness", action="store_true", help="only the throughput part")
    p.add_argument("--run-timeout", type=float, default=600.0,
                   help="seconds a single run may take before it is failed and killed (default 600)")
    p.add_argument("--json", metavar="FILE", help="write medians, every raw sample and the checks here")
    a = p.parse_args(argv)
    a.recipients = a.recipients if a.recipients is not None else (10_000 if a.quick else 100_000)
    a.runs = a.runs if a.runs is not None else (3 if a.quick else 5)
    a.fair_messages = a.fair_messages if a.fair_messages is not None else (10_000 if a.quick else 20_000)
    a.stock_messages = a.stock_messages if a.stock_messages is not None else min(a.recipients, 10_000)
    for name in ("recipients", "runs", "size", "connections", "stock_messages", "fair_messages", "tarpit_every"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.size < 1024:
        p.error("--size must be at least 1024: headers and the DKIM signature alone take ~700 bytes")
    return a


def main(argv: list[str]) -> int:
    if argv[:1] == ["engine-child"]:
        return engine_child(argv[1:])
    if argv[:1] == ["fairness-child"]:
        return fairness_child(argv[1:])
    args = parse_args(argv)

    def log(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    started = time.monotonic()
    throughput: Throughput | None = None
    fairness: Fairness | None = None
    sample_size = 0
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        if not args.skip_throughput:
            log(f"writing a campaign of {args.recipients} recipients over {DOMAINS} domains ...\n")
            files = build_campaign(Path(tmp), args.recipients, args.size)
            sample_size = len(files.sample)
            message_file = os.path.join(tmp, "message.txt")
            Path(message_file).write_bytes(files.sample.replace(b"\r\n", b"\n"))
            sink = stack.enter_context(postfix_smtp_sink())
            throughput = Throughput(files.job, message_file, args.recipients, args.stock_messages,
                                    args.connections, args.max_queued, args.run_timeout, sink)
            log(f"smtp-sink on {sink.target}; messages of {sample_size} bytes (signed)\n")
        if not args.skip_fairness:
            fast = stack.enter_context(fastmta_sink())
            tarpit = stack.enter_context(fastmta_sink(["--delay", args.tarpit_delay]))
            fairness = Fairness(args.fair_messages, args.tarpit_every, args.size, args.connections,
                                args.run_timeout, fast, tarpit)
            log(f"fast fastmta sink on {fast.target}, tarpit ({args.tarpit_delay}) on {tarpit.target}\n")
        steps: list[tuple[str, Callable[[], str | None]]] = []
        if throughput is not None:
            t = throughput
            steps += [(ENGINE, t.run_engine), (SOURCE_REUSE, lambda: t.run_source(SOURCE_REUSE)),
                      (SOURCE_STOCK, lambda: t.run_source(SOURCE_STOCK))]
        if fairness is not None:
            f = fairness
            steps += [("fairness: fast site alone", lambda: f.run(False)),
                      ("fairness: fast site + tarpit", lambda: f.run(True))]
        total = len(steps) * args.runs
        done = 0
        for round_no in range(1, args.runs + 1):
            for what, step in steps:
                step_started = time.monotonic()
                problem = step()
                done += 1
                log(f"[{done}/{total}] round {round_no}: {what}: "
                    f"{'FAILED: ' + problem if problem else 'ok'} ({time.monotonic() - step_started:.1f} s)\n")
    elapsed = time.monotonic() - started

    checks: list[Check] = []
    doc: dict[str, Any] = {
        "argv": [sys.executable, *sys.argv], "quick": args.quick, "runs": args.runs, "elapsed_s": elapsed,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
    }
    failures: list[tuple[str, str]] = []
    print()
    if throughput is not None:
        doc["throughput"] = report_throughput(throughput, args, sample_size, checks)
        failures += [(k, why) for k, s in throughput.samples.items() for why in s.failures]
    if fairness is not None:
        doc["fairness"] = report_fairness(fairness, args, checks)
        failures += [(f"fairness, {k}", why) for k, s in (("alone", fairness.alone), ("with tarpit", fairness.with_tarpit))
                     for why in s.failures]
    print(f"median of {args.runs} rounds, {elapsed:.0f} s in all"
          + ("  [--quick: figures are indicative only]" if args.quick else ""))
    print()
    print("Checks (issue 4):")
    for check in checks:
        print("  " + check.line())
    if failures:
        print()
        print("Failed runs:")
        for (what, why), n in Counter(failures).items():
            print(f"  {what}: {why}" + (f"  (x{n})" if n > 1 else ""))
    doc["checks"] = [asdict(c) for c in checks]
    doc["failures"] = [{"what": w, "why": y} for w, y in failures]
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    if failures:
        return 1
    return 2 if any(c.ok is False for c in checks) else 0


def report_throughput(t: Throughput, args: argparse.Namespace, sample_size: int, checks: list[Check]) -> dict[str, Any]:
    rows = []
    medians: dict[str, dict[str, float | None]] = {}
    for kind, s in t.samples.items():
        m = {
            "messages_per_s": _median(s.messages_per_s),
            "cpu_us_per_message": _median(s.cpu_us_per_message),
            "sink_cpu_us_per_message": _median(s.sink_cpu_us_per_message),
            "render_cpu_us_per_message": _median(s.render_cpu_us_per_message),
            "maxrss_mib": _median(s.maxrss_mib),
        }
        medians[kind] = m
        messages = t.recipients if kind != SOURCE_STOCK else t.stock_messages
        rows.append((f"{kind} → smtp-sink", f"{messages:,}", _fmt(m["messages_per_s"], ",.0f"),
                     _fmt(m["cpu_us_per_message"], ".1f"), _fmt(m["sink_cpu_us_per_message"], ".1f"),
                     _fmt(m["maxrss_mib"], ".0f"), f"{len(s.messages_per_s)}/{args.runs}"))
    print(f"Throughput: {sample_size}-byte DKIM-signed (Ed25519) messages, one recipient each, {DOMAINS} domains, "
          f"{t.connections} connections")
    print(text_table(("sender → server", "messages", "msgs/s", "sender CPU µs/msg", "sink CPU µs/msg",
                      "peak RSS MiB", "ok runs"), rows))
    e = medians[ENGINE]
    total, render = e["cpu_us_per_message"], e["render_cpu_us_per_message"]
    if total is not None and render is not None:
        print(f"engine CPU split: read+render+sign {render:.1f} µs/msg (a pass without delivery), "
              f"engine/SMTP {total - render:.1f} µs/msg (the rest)")
    raw = t.samples[ENGINE].raw
    if raw:
        per_conn = [r["transactions"] / r["connections_opened"] for r in raw if r["connections_opened"]]
        print(f"engine: {statistics.median(r['transactions'] for r in raw):,.0f} transactions, "
              f"{statistics.median(r['connections_opened'] for r in raw):,.0f} connections opened "
              f"({_fmt(_median(per_conn), '.1f')} transactions each), at most "
              f"{max(r['max_connections_seen'] for r in raw)} at once; submitting took "
              f"{statistics.median(r['submit_s'] for r in raw):.1f} s of {statistics.median(r['deliver_wall_s'] for r in raw):.1f} s")
    print()
    checks.append(
        Check(f"engine CPU <= {GOAL_CPU_US:.0f} µs per message (read+render+sign+deliver)", None, "not measured")
        if total is None else
        Check(f"engine CPU <= {GOAL_CPU_US:.0f} µs per message (read+render+sign+deliver)", total <= GOAL_CPU_US,
              f"{total:.1f} µs/msg" + (f" (engine/SMTP alone {total - render:.1f})" if render is not None else ""))
    )
    return {
        "recipients": t.recipients, "stock_messages": t.stock_messages, "message_bytes": sample_size,
        "domains": DOMAINS, "connections": t.connections, "max_queued_recipients": t.max_queued,
        "method": "engine: getrusage(RUSAGE_SELF) in a child process over submit-all + drain, divided by recipients; "
                  "render: a second pass over the same rows without delivery; peak RSS: ru_maxrss after delivery; "
                  "smtp-source: os.wait4 rusage and wall time of the whole run; sink: /proc/PID/stat delta",
        "medians": medians,
        "samples": {k: asdict(s) for k, s in t.samples.items()},
    }


def report_fairness(f: Fairness, args: argparse.Namespace, checks: list[Check]) -> dict[str, Any]:
    alone, with_t = _median(f.alone.messages_per_s), _median(f.with_tarpit.messages_per_s)
    ratio = with_t / alone if alone and with_t is not None else None
    tarpit_msgs = len(range(0, f.messages, f.tarpit_every))
    print(f"Fairness: {f.messages:,} messages to the fast site ({f.size} bytes, {f.connections} connections per site); "
          f"with the tarpit ({args.tarpit_delay}) also {tarpit_msgs:,} tarpit messages, interleaved")
    print(text_table(("scenario", "fast-site msgs/s", "ok runs"), [
        ("fast site alone", _fmt(alone, ",.0f"), f"{len(f.alone.messages_per_s)}/{args.runs}"),
        ("fast site + tarpit site", _fmt(with_t, ",.0f"), f"{len(f.with_tarpit.messages_per_s)}/{args.runs}"),
    ]))
    per_round = f.round_ratios()
    print(f"ratio of the medians: {_fmt(None if ratio is None else 100 * ratio, '.1f')}%; per round: "
          + (", ".join(f"{100 * r:.0f}%" for r in per_round) or "-"))
    print()
    name = f"fast-site rate with a tarpit site >= {GOAL_FAIRNESS:.0%} of its rate without"
    checks.append(Check(name, None, "not measured") if ratio is None or alone is None or with_t is None else
                  Check(name, ratio >= GOAL_FAIRNESS, f"{with_t:,.0f} vs {alone:,.0f} msgs/s = {ratio:.1%}"))
    return {
        "messages": f.messages, "tarpit_every": f.tarpit_every, "tarpit_messages": tarpit_msgs,
        "tarpit_delay": args.tarpit_delay, "size": f.size, "connections": f.connections,
        "median_alone_messages_per_s": alone, "median_with_tarpit_messages_per_s": with_t, "ratio": ratio,
        "ratio_per_round": per_round,
        "samples": {"alone": asdict(f.alone), "with_tarpit": asdict(f.with_tarpit)},
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
