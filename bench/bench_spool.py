#!/usr/bin/env python3
"""Durable-spool benchmark: a million-recipient campaign to smtp-sink, and submit() latency.

Issue 6, acceptance item 4, everything on loopback:

1. Campaign. A campaign job (TOML + text template + recipients CSV + the
   Ed25519 TEST key from ``src/fastmta/examples/spool/``) of N recipients (default
   1,000,000) over 100 domains, each rendered and signed message ~2 KB, is
   delivered by ``python -m fastmta send SPOOL --relay SINK --queue-dir DIR
   --quiet --summary-json FILE`` to Postfix's ``smtp-sink``. The command
   runs as a child process of this script, so its peak RSS is its own
   (``ru_maxrss`` from ``os.wait4``). While it runs, the script samples the
   queue directory's disk use and the child's RSS every ``--poll`` seconds;
   the delivery figures come from the command's summary JSON.

2. submit() latency. In this process, an ``Engine`` with a durable
   ``Spool`` delivers to the same ``smtp-sink`` while producers call
   ``await engine.submit(...)`` and each call is timed:

   * group commit on: ``Spool(commit_interval=0.002)`` (the default) and 256
     concurrent producers, as ``fastmta send`` submits (its window is 256);
   * group commit off: ``Spool(commit_interval=0)`` and one producer. The
     spool has no switch that forbids sharing a commit (with an interval of
     0 it still lets adds that arrive during an fsync share the next one),
     so "off" means nobody else is waiting: every submit waits for a commit
     (body fdatasync + journal fdatasync) of its own;
   * for reference, ``commit_interval=0`` with 256 producers: grouping only
     by overlap with a running fsync.

Exit status: 0 every run completed and every check passed; 1 a run failed
(crash, timeout, recipients not delivered); 2 every run completed but a
check failed (peak RSS over the limit).

Usage:
  python bench/bench_spool.py                            # 1,000,000 recipients (long)
  python bench/bench_spool.py --quick                    # 50,000 recipients, < 2 minutes
  python bench/bench_spool.py --recipients 200000 --json bench/spool-results.json
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (
    Server,
    dir_usage,
    postfix_smtp_sink,
    proc_rss_bytes,
    text_table,
)

REPO = Path(__file__).resolve().parent.parent
TEST_KEY = REPO / "src" / "fastmta" / "examples" / "spool" / "dkim-test-ed25519.key.pem"  # a public TEST key

SENDER = "bounces@news.spool.example"
DKIM_DOMAIN = "news.spool.example"
DOMAINS = 100
MB = 1_000_000
RSS_LIMIT_MB = 500.0  # issue 6: peak RSS <= 500 MB (decimal megabytes: the stricter reading)

Log = Callable[[str], None]


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# The campaign job
# --------------------------------------------------------------------------

_NAMES = ("Ada", "Grace", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Niklaus", "Margaret")
_PARAGRAPH = (
    "Your queue is durable: every message is on disk before it counts as accepted,\n"
    "and every recipient reaches a final state whatever happens to the process.\n"
)


def _recipient(i: int) -> str:
    return f"user{i}@d{i % DOMAINS:03d}.spool.example"


def _write_recipients(path: Path, count: int) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("email", "first_name", "id"))
        for i in range(count):
            w.writerow((_recipient(i), _NAMES[i % len(_NAMES)], f"u{i:07d}"))


def _write_template(directory: Path, paragraphs: int) -> None:
    (directory / "spool.txt").write_text(
        "Hello {{ first_name }},\n\n"
        "account {{ id }} is ready: https://news.spool.example/start?id={{ id | urlencode }}\n\n"
        + _PARAGRAPH * paragraphs
        + "\n-- \nThe fastmta spool bench\n",
        encoding="ascii",
    )


def _write_job(directory: Path) -> Path:
    job = directory / "spool-bench.toml"
    job.write_text(
        "# Written by bench/bench_spool.py; the DKIM key is a public TEST key.\n"
        "[campaign]\n"
        'id = "bench-spool"\n'
        f'sender = "{SENDER}"\n'
        'recipients = "recipients.csv"\n\n'
        "[[dkim]]\n"
        f'domain = "{DKIM_DOMAIN}"\n'
        'selector = "bench"\n'
        'key_path = "dkim-test-ed25519.key.pem"\n'
        'algorithm = "ed25519-sha256"\n\n'
        "[template]\n"
        'text_file = "spool.txt"\n\n'
        "[template.headers]\n"
        f'From = "fastmta bench <news@{DKIM_DOMAIN}>"\n'
        'To = "{{ first_name }} <{{ email }}>"\n'
        'Subject = "Account {{ id }} is ready, {{ first_name }}"\n',
        encoding="utf-8",
    )
    return job


def _first_message(job: Path) -> bytes:
    """The first row's rendered and signed message, as the engine receives it."""
    from fastmta.intake.campaign import Campaign
    from fastmta.intake.reader import SpoolItem

    for item in Campaign.load(job).items():
        if isinstance(item, SpoolItem):
            return item.content
        raise RuntimeError(f"the benchmark campaign rejected its first row: {item}")
    raise RuntimeError("the benchmark campaign has no rows")


@dataclass(frozen=True, slots=True)
class CampaignFiles:
    spool: Path  # the directory given to `fastmta send` (holds only the job)
    job: Path
    sample: bytes  # the first rendered + signed message


def build_campaign(directory: Path, recipients: int, size: int) -> CampaignFiles:
    """Write a campaign job of *recipients* rows whose messages are about *size* bytes.

    The recipients file lives next to the job, in the spool directory; the
    queue directory is elsewhere (``--queue-dir``), so disk samples of the
    queue never include the input.
    """
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEST_KEY, directory / "dkim-test-ed25519.key.pem")
    job = _write_job(directory)
    _write_recipients(directory / "recipients.csv", recipients)
    per_paragraph = len(_PARAGRAPH)
    paragraphs = 0
    _write_template(directory, paragraphs)
    sample = _first_message(job)
    # Pad with whole paragraphs: one correction is enough (the rest of the
    # message does not depend on the padding).
    paragraphs = max(0, round((size - len(sample)) / per_paragraph))
    _write_template(directory, paragraphs)
    sample = _first_message(job)
    return CampaignFiles(directory, job, sample)


# --------------------------------------------------------------------------
# Part 1: the campaign through `fastmta send`, measured from outside
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    t: float  # seconds since the child started
    rss: int  # child's VmRSS, bytes
    disk: int  # queue directory, allocated bytes
    disk_apparent: int  # queue directory, sum of file sizes


@dataclass(slots=True)
class CampaignRun:
    recipients: int
    message_bytes: int
    returncode: int | None = None
    timed_out: bool = False
    wall_s: float = 0.0  # spawn to exit, as seen by this script
    cpu_s: float = 0.0  # child's user + system (wait4 rusage)
    maxrss_bytes: int = 0  # child's ru_maxrss
    sink_cpu_s: float = 0.0
    disk_peak: int = 0  # sampled maximum, allocated bytes
    disk_peak_apparent: int = 0
    disk_end: int = 0  # after the child exited
    disk_end_apparent: int = 0
    disk_end_files: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    stderr_tail: str = ""
    samples: list[Sample] = field(default_factory=list)

    @property
    def delivered(self) -> int:
        return int(self.summary.get("delivered", 0))

    @property
    def ok(self) -> bool:
        return (
            self.returncode == 0
            and not self.timed_out
            and self.delivered == self.recipients
            and not self.summary.get("unfinished")
            and not self.summary.get("rejected")
        )

    @property
    def msgs_per_s(self) -> float:
        """Recipients made final per second of the engine's own run (from its summary)."""
        return float(self.summary.get("recipients_per_s", 0.0))

    def rss_at(self, fraction: float) -> int:
        """The highest RSS sampled up to *fraction* of the run's wall time."""
        limit = fraction * self.wall_s
        return max((s.rss for s in self.samples if s.t <= limit), default=0)


def run_campaign(files: CampaignFiles, recipients: int, sink: Server, work: Path, timeout: float,
                 poll: float, max_queued: int | None, log: Log) -> CampaignRun:
    queue_dir = work / "queue"
    summary_path = work / "summary.json"
    config_path = work / "fastmta.toml"
    # `--relay` keeps the adaptive throttle's slow start (an unknown receiver
    # starts at 10 msg/s on 2 connections and doubles per round); smtp-sink
    # is not a receiver to be polite to, so turn it off, as `--sink` does.
    config = '# Written by bench/bench_spool.py\n[sites."*".adaptive]\nenabled = false\n'
    if max_queued is not None:
        config += f"\n[queue]\nmax_queued_recipients = {max_queued}\n"
    config_path.write_text(config, encoding="utf-8")
    cmd = [
        sys.executable, "-m", "fastmta", "send", str(files.spool), "--relay", sink.target,
        "--config", str(config_path), "--queue-dir", str(queue_dir), "--quiet",
        "--summary-json", str(summary_path),
    ]
    run = CampaignRun(recipients, len(files.sample))
    log(f"campaign: {' '.join(cmd[1:])}")
    sink_cpu0 = sink.cpu_seconds()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            status, usage = _watch(proc, queue_dir, run, started, timeout, poll, log)
        finally:
            if proc.returncode is None:  # not reaped: something went wrong in the watch loop
                proc.kill()
                proc.wait()
        run.wall_s = time.monotonic() - started
        run.returncode = os.waitstatus_to_exitcode(status)
        run.cpu_s = usage.ru_utime + usage.ru_stime
        run.maxrss_bytes = usage.ru_maxrss * 1024  # Linux: KiB
        err.seek(0)
        run.stderr_tail = err.read()[-4000:].decode(errors="replace")
    run.sink_cpu_s = sink.cpu_seconds() - sink_cpu0
    end = dir_usage(queue_dir)
    run.disk_end, run.disk_end_apparent, run.disk_end_files = end.allocated, end.apparent, end.files
    if summary_path.exists():
        run.summary = json.loads(summary_path.read_text())
    return run


def _watch(proc: subprocess.Popen[bytes], queue_dir: Path, run: CampaignRun, started: float, timeout: float,
           poll: float, log: Log) -> tuple[int, Any]:
    """Sample the child until it exits (or kill it at *timeout*); return its wait status and rusage."""
    deadline = started + timeout
    next_report = started + 30.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it is reaped
            return status, usage
        now = time.monotonic()
        if now >= deadline:
            log(f"campaign: no exit after {timeout:.0f} s: killing it")
            run.timed_out = True
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return status, usage
        rss = proc_rss_bytes(proc.pid)
        disk = dir_usage(queue_dir)
        if rss is not None:
            run.samples.append(Sample(round(now - started, 3), rss, disk.allocated, disk.apparent))
            run.disk_peak = max(run.disk_peak, disk.allocated)
            run.disk_peak_apparent = max(run.disk_peak_apparent, disk.apparent)
        if now >= next_report:
            next_report = now + 30.0
            log(f"campaign: {now - started:5.0f} s  RSS {(rss or 0) / MB:6.1f} MB  queue {disk.allocated / MB:7.1f} MB")
        time.sleep(poll)


# --------------------------------------------------------------------------
# Part 2: submit() latency, in this process
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LatencyMode:
    name: str
    commit_interval: float
    producers: int
    submits: int


@dataclass(slots=True)
class LatencyRun:
    mode: LatencyMode
    submitted: int = 0
    submit_wall_s: float = 0.0
    drained: bool = False
    delivered: int = 0
    commits: int = 0  # spool commits during the submit phase
    fsyncs: int = 0  # spool fsyncs during the submit phase
    latencies_us: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.drained and self.delivered == self.submitted > 0

    @property
    def submits_per_s(self) -> float:
        return self.submitted / self.submit_wall_s if self.submit_wall_s > 0 else 0.0


def _percentiles(values_ns: list[int]) -> dict[str, float]:
    """Nearest-rank percentiles (in µs) of a list of nanosecond durations."""
    if not values_ns:
        return {}
    ordered = sorted(values_ns)
    n = len(ordered)

    def rank(p: float) -> float:
        index = min(n - 1, max(0, int(p / 100.0 * n + 0.999999) - 1))
        return ordered[index] / 1000.0

    return {
        "p50": rank(50), "p90": rank(90), "p99": rank(99), "p99.9": rank(99.9),
        "max": ordered[-1] / 1000.0, "mean": sum(ordered) / n / 1000.0,
    }


async def _latency(mode: LatencyMode, target: str, spool_dir: Path, body: bytes, time_cap: float,
                   drain_timeout: float) -> LatencyRun:
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine
    from fastmta.queue.spool import Spool

    config = config_from_dict({
        "routing": {"static": {"*": [target]}},
        "smtp": {"tls": "never"},
        "sites": {"*": {"adaptive": {"enabled": False}}},
    })
    result = LatencyRun(mode)
    spool = await asyncio.to_thread(Spool, spool_dir, commit_interval=mode.commit_interval)
    engine = Engine(config, spool=spool)
    loop = asyncio.get_running_loop()
    samples: list[int] = []
    issued = 0
    stop_at = loop.time() + time_cap

    async def producer() -> None:
        nonlocal issued
        while issued < mode.submits and loop.time() < stop_at:
            i = issued
            issued += 1
            t0 = time.perf_counter_ns()
            await engine.submit(body, SENDER, [_recipient(i)])
            samples.append(time.perf_counter_ns() - t0)

    try:
        async with engine:
            commits0, fsyncs0 = spool.stats.commits, spool.stats.fsyncs
            t0 = time.perf_counter()
            await asyncio.gather(*(producer() for _ in range(mode.producers)))
            result.submit_wall_s = time.perf_counter() - t0
            result.commits = spool.stats.commits - commits0
            result.fsyncs = spool.stats.fsyncs - fsyncs0
            result.drained = await engine.drain(drain_timeout)
            result.delivered = engine.counts.get("delivered", 0)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        await spool.close()
    result.submitted = len(samples)
    result.latencies_us = _percentiles(samples)
    return result


def run_latency(mode: LatencyMode, sink: Server, work: Path, body: bytes, time_cap: float, log: Log) -> LatencyRun:
    import uvloop  # as `fastmta send` runs

    spool_dir = work / f"latency-{mode.name.replace(' ', '-')}"
    log(f"latency: {mode.name}: commit_interval={mode.commit_interval}, {mode.producers} producer(s), "
        f"up to {mode.submits} submits or {time_cap:.0f} s")
    result = uvloop.run(_latency(mode, sink.target, spool_dir, body, time_cap, drain_timeout=120.0))
    shutil.rmtree(spool_dir, ignore_errors=True)
    return result


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / MB:.1f}"


def campaign_table(run: CampaignRun) -> str:
    s = run.summary
    rows = [
        ["recipients delivered", f"{run.delivered:,} of {run.recipients:,}"],
        ["message size (rendered + signed)", f"{run.message_bytes:,} B"],
        ["msgs/s (engine's own, from its summary)", f"{run.msgs_per_s:,.0f}"],
        ["msgs/s (spawn to exit)", f"{run.delivered / run.wall_s:,.0f}" if run.wall_s else "-"],
        ["engine elapsed / wall", f"{s.get('elapsed_s', 0):.1f} s / {run.wall_s:.1f} s"],
        ["fastmta send CPU per msg", f"{run.cpu_s / max(run.delivered, 1) * 1e6:.0f} µs"],
        ["smtp-sink CPU per msg", f"{run.sink_cpu_s / max(run.delivered, 1) * 1e6:.1f} µs"],
        ["peak RSS (ru_maxrss)", f"{_mb(run.maxrss_bytes)} MB"],
        ["RSS at 25/50/75/100% of the run (sampled)",
         " / ".join(_mb(run.rss_at(f)) for f in (0.25, 0.5, 0.75, 1.0)) + " MB"],
        ["queue disk peak (sampled, allocated / apparent)",
         f"{_mb(run.disk_peak)} / {_mb(run.disk_peak_apparent)} MB"],
        ["queue disk at the end (allocated / apparent)",
         f"{_mb(run.disk_end)} / {_mb(run.disk_end_apparent)} MB ({run.disk_end_files} files)"],
    ]
    return text_table(["campaign (fastmta send → smtp-sink)", "value"], rows)


def latency_table(runs: Sequence[LatencyRun]) -> str:
    rows = []
    for r in runs:
        lat = r.latencies_us
        rows.append([
            r.mode.name, f"{r.mode.commit_interval * 1000:g}", str(r.mode.producers), f"{r.submitted:,}",
            f"{r.submits_per_s:,.0f}", f"{r.submitted / r.commits:.1f}" if r.commits else "-",
            *(f"{lat[k]:,.0f}" if k in lat else "-" for k in ("p50", "p99", "max")),
        ])
    return text_table(
        ["submit() latency", "interval ms", "producers", "submits", "submits/s", "submits/commit",
         "p50 µs", "p99 µs", "max µs"],
        rows,
    )


def _checks(run: CampaignRun | None, latency: Sequence[LatencyRun]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    if run is not None:
        peak = run.maxrss_bytes / MB
        checks.append({
            "name": f"peak RSS <= {RSS_LIMIT_MB:.0f} MB ({run.recipients:,} recipients)",
            "value": round(peak, 1), "passed": peak <= RSS_LIMIT_MB,
        })
        checks.append({
            "name": "every recipient delivered, exit status 0",
            "value": f"{run.delivered:,}/{run.recipients:,}, exit {run.returncode}", "passed": run.ok,
        })
    for r in latency:
        checks.append({
            "name": f"latency run '{r.mode.name}' delivered everything it submitted",
            "value": f"{r.delivered:,}/{r.submitted:,}" + (f" ({r.error})" if r.error else ""), "passed": r.ok,
        })
    return checks


def _machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(), "processor": platform.processor() or platform.machine(),
    }


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 50,000 recipients, shorter latency runs (< 2 minutes)")
    p.add_argument("--recipients", type=int, help="campaign recipients (default 1,000,000; --quick 50,000)")
    p.add_argument("--size", type=int, default=2048, help="rendered + signed message size in bytes (default 2048)")
    p.add_argument("--submits", type=int,
                   help="submits per group-commit latency run (default 50,000; --quick 10,000)")
    p.add_argument("--solo-submits", type=int,
                   help="submits of the one-producer (group commit off) run (default 5,000; --quick 1,000)")
    p.add_argument("--max-queued", type=int, metavar="N",
                   help="the campaign's queue.max_queued_recipients (default: the engine's default)")
    p.add_argument("--producers", type=int, default=256, help="concurrent producers with group commit (default 256)")
    p.add_argument("--commit-interval", type=float, default=0.002,
                   help="group commit window in seconds (default 0.002, the Spool default)")
    p.add_argument("--latency-cap", type=float, default=60.0, help="stop a latency run's submits after this (s)")
    p.add_argument("--poll", type=float, default=0.25, help="disk/RSS sampling interval during the campaign (s)")
    p.add_argument("--run-timeout", type=float,
                   help="kill the campaign after this many seconds (default 600 + 2 ms per recipient)")
    p.add_argument("--skip-campaign", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--workdir", type=Path, help="where to put the job and queue (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure, sample and check as JSON")
    args = p.parse_args(argv)
    if args.recipients is None:
        args.recipients = 50_000 if args.quick else 1_000_000
    if args.submits is None:
        args.submits = 10_000 if args.quick else 50_000
    if args.solo_submits is None:
        args.solo_submits = 1_000 if args.quick else 5_000
    if args.run_timeout is None:
        args.run_timeout = 600.0 + 0.002 * args.recipients
    if args.recipients < 1 or args.submits < 1 or args.solo_submits < 1 or args.producers < 1:
        p.error("counts must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fastmta-bench-spool-"))
    work.mkdir(parents=True, exist_ok=True)
    modes = [
        LatencyMode("group commit on", args.commit_interval, args.producers, args.submits),
        LatencyMode("group commit off", 0.0, 1, args.solo_submits),
        LatencyMode("interval 0, many producers", 0.0, args.producers, args.submits),
    ]
    campaign: CampaignRun | None = None
    latency: list[LatencyRun] = []
    try:
        _log(f"writing a campaign of {args.recipients:,} recipients to {work / 'spool'}")
        t0 = time.monotonic()
        files = build_campaign(work / "spool", args.recipients, args.size)
        _log(f"  done in {time.monotonic() - t0:.1f} s; message size {len(files.sample):,} B")
        with postfix_smtp_sink() as sink:
            if not args.skip_campaign:
                campaign = run_campaign(files, args.recipients, sink, work, args.run_timeout, args.poll,
                                        args.max_queued, _log)
                shutil.rmtree(work / "queue", ignore_errors=True)
            if not args.skip_latency:
                for mode in modes:
                    latency.append(run_latency(mode, sink, work, files.sample, args.latency_cap, _log))
    finally:
        if args.keep or args.workdir:
            _log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    if campaign is not None:
        print(campaign_table(campaign))
        if not campaign.ok:
            print(f"\nCampaign run FAILED (exit {campaign.returncode}, timed out: {campaign.timed_out}); "
                  f"stderr tail:\n{campaign.stderr_tail}")
        print()
    if latency:
        print(latency_table(latency))
        print()
    checks = _checks(campaign, latency)
    for c in checks:
        print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {c['value']}")
    if args.quick:
        print("\n(--quick: a smoke test; its figures are too short to quote)")

    if args.json:
        doc = {
            "benchmark": "bench_spool", "quick": args.quick, "args": {k: str(v) for k, v in vars(args).items()},
            "machine": _machine(),
            "campaign": None if campaign is None else {
                **{k: v for k, v in asdict(campaign).items() if k != "samples"},
                "msgs_per_s": campaign.msgs_per_s, "ok": campaign.ok,
                "samples": [asdict(s) for s in campaign.samples],
            },
            "latency": [
                {**asdict(r), "submits_per_s": r.submits_per_s, "ok": r.ok} for r in latency
            ],
            "checks": checks,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        _log(f"wrote {args.json}")

    failed = (campaign is not None and not campaign.ok) or any(not r.ok for r in latency)
    if failed:
        return 1
    return 0 if all(c["passed"] for c in checks) else 2


if __name__ == "__main__":
    sys.exit(main())
