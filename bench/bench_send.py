#!/usr/bin/env python3
"""The real ``fastmta send`` path against Postfix draining its queue, same run, same sink (issue 18, item 1).

Everything on loopback, one Postfix ``smtp-sink`` for the whole benchmark
(``-c``: it counts every message, so each run is checked against it). Per
round, the same N messages of ~2 KB, one recipient each, over 100 recipient
domains:

* **Postfix** (the reference): a private instance (tests/postfix_private.py:
  its own config, queue and data directories, never the machine's Postfix)
  with ``hold=True`` is filled by smtp-source (20 sessions, 100 domains, as
  bench_serve.py injects), every message on the hold queue, nothing sent.
  Then the hold is lifted (``postfix reload``, not timed), ``postsuper -H
  ALL`` moves the held mail to the deferred queue and ``postqueue -f``
  starts the drain. msgs/s = N / (N-th message at the sink - ``postqueue
  -f``; from ``postsuper`` if the sink saw a message before the flush), the
  time of ``postsuper`` itself is reported beside it. CPU = the instance's
  process tree (master, qmgr, smtp, trivial-rewrite, postlogd, ...; see
  bench_serve.tree_cpu) from just before ``postsuper`` until the queue is
  empty and the log has every ``status=sent``, / N (``postsuper`` and
  ``postqueue`` themselves are our children, not counted; in the JSON).
  Concurrency 20 to the relay (``default_destination_concurrency_limit``,
  ``smtp_destination_concurrency_limit`` and, like fastmta without slow
  start, ``initial_destination_concurrency``).
* **fastmta send**, as a user runs it: ``python -m fastmta send SPOOL --relay
  SINK --config BENCH.toml --queue-dir Q --quiet --accounting A.jsonl
  --summary-json S.json``, BENCH.toml giving ``[sites."*"] max_connections =
  20`` and no adaptive slow start (``--relay`` keeps it; a loopback sink is no
  receiver to be polite to), ``[smtp] tls = "never"``. Each run a new queue
  directory and accounting file:

  - ``pickup``: N pickup files (X-Sender/X-Receiver + the 2 KB message
    ``fastmta load`` makes, one recipient each);
  - ``campaign``: the bundled Ed25519-signed campaign
    (src/fastmta/examples/spool/welcome.toml, text + HTML) with a recipients
    CSV of N rows;
  - ``rsa100k``: the same campaign with a ~100 KB HTML part and an RSA-2048
    DKIM key (generated into the work directory), ``--n-large`` rows.

  msgs/s = N / (spawn to exit of the process: start-up, reading the spool,
  the durable queue and the accounting log included); CPU = the process's
  user + system from ``os.wait4`` / N (its intake process included: it is
  reaped, so wait4 counts it); peak RSS = its ``ru_maxrss``, or with an
  intake process (the default) the sum of both processes' peaks from the
  summary, an overestimate since the pages they share count twice.

Every run is checked: exit status 0, the summary's ``delivered`` = N, nothing
rejected or unfinished, N ``delivered`` lines in the accounting log, the sink
got exactly N more messages (Postfix: N at the sink, N ``status=sent`` in its
log, queue empty). Failed runs are left out of the medians.

Goals (issue 18): pickup and campaign >= 8x Postfix's msgs/s at <= 0.1x its
CPU per message; rsa100k >= 1,500 msgs/s. ``--million``: the
1,000,000-recipient campaign, peak RSS <= 250 MB and the queue's disk space
released at the end.

Exit status: 0 every run completed and every goal is met; 1 a run failed;
2 every run completed but a goal is not met.

Usage:
  python bench/bench_send.py --json bench/send-results.json   # 50,000 / 10,000 messages x 3 rounds (quiet machine)
  python bench/bench_send.py --quick                          # 2,000 / 500 messages, 1 round: a smoke test
  python bench/bench_send.py --quick --profile --only pickup  # one run under py-spy, the top 25 entries
  python bench/bench_send.py --million                        # 1,000,000-recipient campaign: RSS and disk (long)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))
from _util import dir_usage, find_tool, text_table, tree_rss_bytes  # noqa: E402
from bench_serve import CountingSink, Injection, counting_sink, tree_cpu  # noqa: E402
from postfix_private import private_postfix  # noqa: E402

EXAMPLES = REPO / "src" / "fastmta" / "examples" / "spool"
SENDER = "app@inject.bench.example"
SIZE = 2048
BIG_SIZE = 100 * 1024  # rsa100k: the rendered and signed message
DOMAINS = 100
CONNECTIONS = 20
MB = 1_000_000

POSTFIX, PICKUP, CAMPAIGN, RSA100K = "postfix", "pickup", "campaign", "rsa100k"
CASES = (POSTFIX, PICKUP, CAMPAIGN, RSA100K)
FASTMTA_CASES = (PICKUP, CAMPAIGN, RSA100K)
LABELS = {
    POSTFIX: "Postfix: drain of a held queue",
    PICKUP: "fastmta send: pickup files",
    CAMPAIGN: "fastmta send: Ed25519 campaign",
    RSA100K: "fastmta send: 100 KB RSA-2048 campaign",
}

GOAL_RATE = 8.0  # pickup and campaign: msgs/s >= 8x Postfix's
GOAL_CPU = 0.1  # ... at <= 0.1x its CPU per message
GOAL_RSA_RATE = 1500.0  # rsa100k: msgs/s
CORES = os.cpu_count() or 1
GOAL_MILLION_RSS_MB = 250.0  # --million: peak RSS (decimal MB, the stricter reading)

Log = Callable[[str], None]


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _wait(pred: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def recipient(i: int) -> str:
    return f"user{i}@d{i % DOMAINS:03d}.bench.example"


_TO_LINE = b"To: <rcpt@bench.example>\r\n"


def base_message() -> bytes:
    """The 2 KB message `fastmta load` makes, addressed to a placeholder (see message_to)."""
    from fastmta.load.workload import make_message

    base = make_message(SIZE, SENDER, "rcpt@bench.example")
    assert _TO_LINE in base
    return base


def message_to(base: bytes, i: int) -> bytes:
    """*base* addressed to recipient *i* (every message differs: pickup input is known by its bytes' hash)."""
    return base.replace(_TO_LINE, f"To: <{recipient(i)}>\r\n".encode(), 1)


def write_pickup_spool(directory: Path, n: int) -> int:
    """N pickup files, one recipient each over 100 domains; returns the size of one message (no envelope)."""
    directory.mkdir(parents=True)
    base = base_message()
    for i in range(n):
        data = f"X-Sender: {SENDER}\r\nX-Receiver: {recipient(i)}\r\n".encode() + message_to(base, i)
        with open(directory / f"m{i:07d}.eml", "wb") as f:
            f.write(data)
    return len(base)


_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Dennis")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman", "Ritchie")


def _write_recipients(path: Path, n: int) -> None:
    """The bundled campaign's columns (email, first_name, last_name, id, signup), N rows over 100 domains."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("email", "first_name", "last_name", "id", "signup"))
        for i in range(n):
            first, last = _FIRST[i % 10], _LAST[(i // 10) % 10]
            w.writerow((f"{first.lower()}.{last.lower()}{i}@d{i % DOMAINS:03d}.bench.example", first, last,
                        f"u{i:07d}", f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}"))


_HTML_BLOCK = (
    '<tr><td style="padding:8px 16px;font-family:Helvetica,Arial,sans-serif;font-size:14px;color:#333333">'
    "<h2>Section {k}: what is new for {{{{ first_name | default(\"friend\") }}}}</h2>"
    "<p>This week: the release notes, three articles from the community and an invitation to the next "
    "meetup. Thank you for reading; reply to this message if you have questions.</p>"
    '<p><a href="https://news.fastmta.example/read?id={{{{ id | urlencode }}}}&amp;s={k}">Read more</a></p>'
    "</td></tr>\n"
)


def _big_html(target: int) -> str:
    """welcome.html with ~*target* bytes of table rows (a merge field in each) before </body>."""
    html = (EXAMPLES / "welcome.html").read_text(encoding="utf-8")
    rows = []
    size = len(html)
    k = 0
    while size < target:
        row = _HTML_BLOCK.format(k=k)
        rows.append(row)
        size += len(row)
        k += 1
    body = '<table role="presentation" width="100%" cellpadding="0" cellspacing="0">\n' + "".join(rows) + "</table>\n"
    assert "</body>" in html
    return html.replace("</body>", body + "</body>", 1)


def _rsa_key_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_campaign(directory: Path, n: int, big: bool) -> Path:
    """The bundled campaign (welcome.toml and its files) with N recipient rows; *big*: 100 KB HTML + RSA-2048."""
    directory.mkdir(parents=True)
    for name in ("welcome.txt", "welcome.html", "dkim-test-ed25519.key.pem"):
        shutil.copyfile(EXAMPLES / name, directory / name)
    job = (EXAMPLES / "welcome.toml").read_text(encoding="utf-8")
    if big:
        edits = {
            'key_path = "dkim-test-ed25519.key.pem"': 'key_path = "dkim-bench-rsa2048.key.pem"',
            'algorithm = "ed25519-sha256"': 'algorithm = "rsa-sha256"',
            'html_file = "welcome.html"': 'html_file = "welcome-100k.html"',
        }
        for old, new in edits.items():
            if old not in job:
                raise RuntimeError(f"welcome.toml changed: {old!r} not found")
            job = job.replace(old, new, 1)
        (directory / "dkim-bench-rsa2048.key.pem").write_bytes(_rsa_key_pem())
    (directory / "welcome.toml").write_text(job, encoding="utf-8")
    _write_recipients(directory / "recipients.csv", n)
    if big:
        # Size the HTML so that the rendered and signed message is ~100 KB: one correction is enough.
        html = directory / "welcome-100k.html"
        html.write_text(_big_html(BIG_SIZE), encoding="utf-8")
        html.write_text(_big_html(2 * BIG_SIZE - first_message_size(directory / "welcome.toml")), encoding="utf-8")
    return directory / "welcome.toml"


def rsa_sign_us(rounds: int = 3, n: int = 200) -> float:
    """CPU of one RSA-2048 PKCS#1 v1.5 SHA-256 signature through ``cryptography`` (what fastmta signs with): median µs."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    data = b"x" * 600  # the canonical header fields a DKIM signature covers
    per = []
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(n):
            key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        per.append((time.process_time() - t) / n * 1e6)
    return statistics.median(per)


def first_message_size(job: Path) -> int:
    """Size of the first row's rendered and signed message."""
    from fastmta.intake.campaign import Campaign
    from fastmta.intake.reader import SpoolItem

    for item in Campaign.load(job).items():
        if isinstance(item, SpoolItem):
            return len(item.content)
        raise RuntimeError(f"the benchmark campaign rejected its first row: {item}")
    raise RuntimeError("the benchmark campaign has no rows")


@dataclass
class Inputs:
    workdir: Path
    message_file: Path | None = None  # smtp-source -F (bare LFs)
    spools: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    config: Path | None = None


def fastmta_config(path: Path, connections: int) -> Path:
    path.write_text(
        "# Written by bench/bench_send.py\n"
        '[smtp]\ntls = "never"\n\n'
        f'[sites."*"]\nmax_connections = {connections}\n\n'
        '[sites."*".adaptive]\nenabled = false\n',
        encoding="utf-8",
    )
    return path


def build_inputs(workdir: Path, cases: Sequence[str], args: argparse.Namespace, log: Log) -> Inputs:
    from fastmta.load.workload import make_message

    inputs = Inputs(workdir)
    inputs.config = fastmta_config(workdir / "fastmta-bench.toml", args.connections)
    for case in cases:
        t = time.perf_counter()
        if case == POSTFIX:
            inputs.message_file = workdir / "message.txt"
            # smtp-source -F appends CRLF to each line itself: the file holds bare LFs.
            msg = make_message(SIZE, SENDER, "rcpt@bench.example")
            inputs.message_file.write_bytes(msg.replace(b"\r\n", b"\n"))
            inputs.message_file.chmod(0o644)
            inputs.counts[case], inputs.sizes[case] = args.n, len(msg) + 2
        elif case == PICKUP:
            inputs.spools[case] = workdir / "spool-pickup"
            inputs.sizes[case] = write_pickup_spool(inputs.spools[case], args.n)
            inputs.counts[case] = args.n
        elif case in (CAMPAIGN, RSA100K):
            n = args.n if case == CAMPAIGN else args.n_large
            inputs.spools[case] = workdir / f"spool-{case}"
            job = write_campaign(inputs.spools[case], n, big=case == RSA100K)
            inputs.sizes[case] = first_message_size(job)
            inputs.counts[case] = n
        log(f"inputs: {case}: {inputs.counts[case]:,} messages of ~{inputs.sizes[case]:,} B "
            f"({time.perf_counter() - t:.1f} s)")
    return inputs


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------


@dataclass
class Run:
    case: str
    round: int
    n: int
    ok: bool = False
    failure: str = ""
    wall_s: float | None = None
    msgs_per_s: float | None = None
    cpu_s: float | None = None
    cpu_us_per_msg: float | None = None
    maxrss_bytes: int | None = None
    sink_count: int | None = None
    delivered: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    t: float
    rss: int
    disk: int


@dataclass
class Child:
    returncode: int
    timed_out: bool
    wall_s: float
    cpu_s: float
    maxrss_bytes: int
    stderr_tail: str
    samples: list[Sample]


def run_child(cmd: Sequence[str], timeout: float, sample_dir: Path | None = None, poll: float = 0.5) -> Child:
    """Run *cmd* to its exit: wall time, CPU and peak RSS from ``os.wait4``.

    Without *sample_dir* the parent just blocks in ``wait4`` (a watchdog thread kills the child after
    *timeout*); with it, the child's VmRSS and the directory's disk use are sampled every *poll* seconds.
    """
    samples: list[Sample] = []
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            proc.kill()

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        try:
            if sample_dir is None:
                _, status, usage = os.wait4(proc.pid, 0)
            else:
                while True:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    rss = tree_rss_bytes(proc.pid)
                    if rss is not None:
                        samples.append(Sample(round(time.perf_counter() - started, 3), rss,
                                              dir_usage(sample_dir).allocated))
                    time.sleep(poll)
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen the child is reaped
        err.seek(0)
        return Child(proc.returncode, killed.is_set(), wall, usage.ru_utime + usage.ru_stime,
                     usage.ru_maxrss * 1024, err.read()[-3000:].decode(errors="replace"), samples)


def send_command(spool: Path, sink: CountingSink, config: Path, rundir: Path) -> list[str]:
    return [
        sys.executable, "-m", "fastmta", "send", str(spool), "--relay", f"{sink.host}:{sink.port}",
        "--config", str(config), "--queue-dir", str(rundir / "queue"), "--quiet",
        "--accounting", str(rundir / "accounting.jsonl"), "--summary-json", str(rundir / "summary.json"),
    ]


def count_delivered(path: Path) -> tuple[int, int]:
    """(lines, lines with status "delivered") of a JSON-lines accounting log."""
    lines = delivered = 0
    try:
        with open(path, "rb") as f:
            for raw in f:
                lines += 1
                with contextlib.suppress(ValueError):
                    delivered += json.loads(raw).get("status") == "delivered"
    except FileNotFoundError:
        pass
    return lines, delivered


def check_send(run: Run, child: Child, rundir: Path, sink: CountingSink, sink0: int) -> None:
    """Fill *run* from a finished ``fastmta send`` child and check it; ``run.ok`` if every check holds."""
    n = run.n
    run.wall_s, run.cpu_s, run.maxrss_bytes = child.wall_s, child.cpu_s, child.maxrss_bytes
    run.msgs_per_s = n / child.wall_s
    run.cpu_us_per_msg = child.cpu_s / n * 1e6
    _wait(lambda: sink.count() - sink0 >= n, 5.0)
    time.sleep(0.1)  # a duplicate would show here
    run.sink_count = sink.count() - sink0
    summary: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((rundir / "summary.json").read_text())
    run.delivered = int(summary.get("delivered", 0))
    if summary.get("intake_peak_rss_bytes"):
        # ru_maxrss from wait4 is the larger of the two processes, not their sum: add them up instead
        # (an overestimate: the pages the intake process shares with its parent count twice).
        run.maxrss_bytes = int(summary["peak_rss_bytes"]) + int(summary["intake_peak_rss_bytes"])
    lines, acct_delivered = count_delivered(rundir / "accounting.jsonl")
    run.extra.update({
        "returncode": child.returncode, "engine_msgs_per_s": summary.get("recipients_per_s"),
        "engine_elapsed_s": summary.get("elapsed_s"), "accounting_lines": lines,
        "accounting_delivered": acct_delivered,
        "summary": {k: v for k, v in summary.items() if k not in ("sites",)},
    })
    problems = []
    if child.timed_out:
        problems.append("killed at the run timeout")
    if child.returncode != 0:
        problems.append(f"exit status {child.returncode}")
    if run.delivered != n:
        problems.append(f"summary: {run.delivered} of {n} delivered")
    if summary.get("unfinished") or summary.get("rejected"):
        problems.append(f"summary: unfinished {summary.get('unfinished')}, rejected {len(summary.get('rejected') or [])}")
    if acct_delivered != n:
        problems.append(f"accounting: {acct_delivered} of {n} delivered ({lines} lines)")
    if run.sink_count != n:
        problems.append(f"the sink got {run.sink_count} of {n}")
    if problems:
        run.failure = "; ".join(problems)
        run.extra["stderr_tail"] = child.stderr_tail
    else:
        run.ok = True


def run_fastmta(case: str, rnd: int, args: argparse.Namespace, inputs: Inputs, sink: CountingSink,
                log: Log) -> Run:
    run = Run(case, rnd, inputs.counts[case])
    rundir = Path(tempfile.mkdtemp(prefix=f"{case}-{rnd}-", dir=inputs.workdir))
    assert inputs.config is not None
    cmd = send_command(inputs.spools[case], sink, inputs.config, rundir)
    if rnd == 0:
        log("  " + " ".join(cmd[1:]))
    sink0, sink_cpu0 = sink.count(), sink.cpu_s()
    child = run_child(cmd, args.run_timeout)
    check_send(run, child, rundir, sink, sink0)
    run.extra["sink_cpu_us_per_msg"] = (sink.cpu_s() - sink_cpu0) / run.n * 1e6
    end = dir_usage(rundir / "queue")
    run.extra["queue_disk_end"] = {"allocated": end.allocated, "apparent": end.apparent, "files": end.files}
    if not args.keep:
        shutil.rmtree(rundir, ignore_errors=True)
    return run


def postfix_settings(args: argparse.Namespace) -> dict[str, str]:
    return {
        "default_destination_concurrency_limit": str(args.connections),
        "smtp_destination_concurrency_limit": str(args.connections),
        "initial_destination_concurrency": str(args.connections),
        **args.postfix_set,
    }


def run_postfix(rnd: int, args: argparse.Namespace, inputs: Inputs, sink: CountingSink, log: Log) -> Run:
    n = inputs.counts[POSTFIX]
    run = Run(POSTFIX, rnd, n)
    assert inputs.message_file is not None
    rundir = Path(tempfile.mkdtemp(prefix=f"postfix-{rnd}-", dir=inputs.workdir))
    rundir.chmod(0o755)
    try:
        with private_postfix(sink.address, hold=True, base_dir=rundir, start_timeout=60,
                             main_cf=postfix_settings(args)) as pf:
            master = pf.master_pid
            if master is None:
                run.failure = "the Postfix master is not running"
                return run
            run.extra["main_cf"] = dict(pf.main_cf)
            sink0 = sink.count()
            # 1. Fill the hold queue.
            cpu_inject0 = tree_cpu(master).total_s
            injection = Injection(pf.target, inputs.message_file, n)
            t = time.perf_counter()
            injection.start()
            try:
                if not _wait(lambda: injection.done() or bool(injection.failures), args.run_timeout, 0.1):
                    run.failure = f"injection not finished after {args.run_timeout:g} s"
                    return run
            finally:
                injection.stop()
            if injection.failures:
                run.failure = injection.failures[0]
                return run
            if not _wait(lambda: pf.queue_counts()["hold"] >= n, 120, 0.2):
                run.failure = f"not every message on hold: {pf.queue_counts()}"
                return run
            run.extra["injection_s"] = time.perf_counter() - t
            run.extra["injection_cpu_s"] = tree_cpu(master).total_s - cpu_inject0
            if sink.count() != sink0:
                run.failure = f"Postfix delivered {sink.count() - sink0} messages while holding"
                return run
            # 2. Lift the hold for new mail (a reload, not timed), then release the held mail and time the drain.
            pf.unset("smtpd_end_of_data_restrictions")
            cpu0 = tree_cpu(master)
            sink_cpu0 = sink.cpu_s()
            times0 = os.times()
            t0 = time.perf_counter()
            pf.run("postsuper", "-H", "ALL")
            t_flush = time.perf_counter()
            early = sink.count() - sink0
            pf.flush()
            start = t_flush if early == 0 else t0
            run.extra["postsuper_s"] = t_flush - t0
            run.extra["delivered_before_flush"] = early
            deadline = t0 + args.run_timeout
            while sink.count() - sink0 < n:
                if time.perf_counter() > deadline:
                    run.failure = (f"timeout after {args.run_timeout:g} s: {sink.count() - sink0} of {n} at the sink; "
                                   f"queue {pf.queue_counts()}")
                    run.extra["log_tail"] = pf.log_tail(2000)
                    return run
                time.sleep(0.02)
            t_end = time.perf_counter()
            if not _wait(lambda: pf.queued() == 0, 60, 0.1):
                run.failure = f"queue not empty 60 s after the last delivery: {pf.queue_counts()}"
                return run
            run.extra["queue_empty_after_s"] = time.perf_counter() - start
            _wait(lambda: pf.sent_count() >= n, 15, 0.25)  # the log is written asynchronously (postlogd)
            cpu1 = tree_cpu(master)
            run.extra["sink_cpu_us_per_msg"] = (sink.cpu_s() - sink_cpu0) / n * 1e6
            times1 = os.times()
            run.delivered = pf.sent_count()
            time.sleep(0.2)
            run.sink_count = sink.count() - sink0
            run.wall_s = t_end - start
            run.msgs_per_s = n / run.wall_s
            run.cpu_s = cpu1.total_s - cpu0.total_s
            run.cpu_us_per_msg = run.cpu_s / n * 1e6
            run.extra["cpu_by_process_s"] = {k: round(v - cpu0.by_name.get(k, 0.0), 3) for k, v in cpu1.by_name.items()
                                             if v - cpu0.by_name.get(k, 0.0) > 0}
            run.extra["release_commands_cpu_s"] = (times1.children_user - times0.children_user
                                                   + times1.children_system - times0.children_system)
            if run.sink_count != n or run.delivered != n:
                run.failure = f"the sink got {run.sink_count}, Postfix's log says {run.delivered} sent, of {n}"
                return run
            run.ok = True
    finally:
        if not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)
    return run


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else format(x, spec) + suffix


@dataclass
class Summary:
    case: str
    n: int
    message_bytes: int
    runs: int
    ok_runs: int
    msgs_per_s: float | None
    cpu_us_per_msg: float | None
    maxrss_mb: float | None
    wall_s: float | None
    #: smtp-sink's CPU per message in the same runs: the receiving side shares the machine's cores.
    sink_cpu_us_per_msg: float | None = None

    def ceiling(self, cores: int) -> float | None:
        """msgs/s the machine could reach at these CPU costs, sender and sink on *cores* cores, fully busy."""
        if not self.cpu_us_per_msg or self.sink_cpu_us_per_msg is None:
            return None
        return cores * 1e6 / (self.cpu_us_per_msg + self.sink_cpu_us_per_msg)


def summarize(runs: list[Run], case: str, inputs: Inputs) -> Summary:
    mine = [r for r in runs if r.case == case]
    ok = [r for r in mine if r.ok]
    rss = _median([r.maxrss_bytes for r in ok if r.maxrss_bytes is not None])
    return Summary(case, inputs.counts.get(case, 0), inputs.sizes.get(case, 0), len(mine), len(ok),
                   _median([r.msgs_per_s for r in ok]), _median([r.cpu_us_per_msg for r in ok]),
                   None if rss is None else rss / MB, _median([r.wall_s for r in ok]),
                   _median([r.extra.get("sink_cpu_us_per_msg") for r in ok]))


@dataclass
class Check:
    name: str
    ok: bool | None
    detail: str


def checks(summaries: dict[str, Summary]) -> list[Check]:
    out: list[Check] = []
    pf = summaries.get(POSTFIX)
    for case in (PICKUP, CAMPAIGN):
        s = summaries.get(case)
        if s is None or pf is None:
            continue
        name = f"{case}: msgs/s >= {GOAL_RATE:g}x Postfix"
        if s.msgs_per_s is None or pf.msgs_per_s is None:
            out.append(Check(name, None, "not measured"))
        else:
            r = s.msgs_per_s / pf.msgs_per_s
            out.append(Check(name, r >= GOAL_RATE, f"{s.msgs_per_s:,.0f} vs {pf.msgs_per_s:,.0f} msgs/s = {r:.2f}x"))
        name = f"{case}: CPU/msg <= {GOAL_CPU:g}x Postfix"
        if s.cpu_us_per_msg is None or pf.cpu_us_per_msg is None:
            out.append(Check(name, None, "not measured"))
        else:
            r = s.cpu_us_per_msg / pf.cpu_us_per_msg
            out.append(Check(name, r <= GOAL_CPU, f"{s.cpu_us_per_msg:,.1f} vs {pf.cpu_us_per_msg:,.1f} µs/msg = "
                                                  f"{r:.3f}x (<= {GOAL_CPU * pf.cpu_us_per_msg:,.1f} µs)"))
    s = summaries.get(RSA100K)
    if s is not None:
        name = f"{RSA100K}: msgs/s >= {GOAL_RSA_RATE:,.0f}"
        out.append(Check(name, None, "not measured") if s.msgs_per_s is None else
                   Check(name, s.msgs_per_s >= GOAL_RSA_RATE, f"{s.msgs_per_s:,.0f} msgs/s"))
    return out


def table(summaries: dict[str, Summary]) -> str:
    head = ["case", "messages", "msg size", "msgs/s", "CPU µs/msg", "peak RSS MB", "wall s", "msgs/s vs Postfix",
            "CPU/msg vs Postfix", "sink CPU µs/msg", f"ceiling msgs/s ({CORES} cores)", "ok runs"]
    pf = summaries.get(POSTFIX)
    rows = []
    for case, s in summaries.items():
        rate_ratio = cpu_ratio = "-"
        if case in (PICKUP, CAMPAIGN) and pf is not None:  # the same 2 KB-class messages as Postfix's
            if s.msgs_per_s and pf.msgs_per_s:
                rate_ratio = f"{s.msgs_per_s / pf.msgs_per_s:.2f}x"
            if s.cpu_us_per_msg and pf.cpu_us_per_msg:
                cpu_ratio = f"{s.cpu_us_per_msg / pf.cpu_us_per_msg:.3f}x"
        rows.append([LABELS[case], f"{s.n:,}", f"{s.message_bytes:,} B", _fmt(s.msgs_per_s, ",.0f"),
                     _fmt(s.cpu_us_per_msg, ",.1f"), _fmt(s.maxrss_mb, ".1f"), _fmt(s.wall_s, ".1f"), rate_ratio,
                     cpu_ratio, _fmt(s.sink_cpu_us_per_msg, ",.1f"), _fmt(s.ceiling(CORES), ",.0f"),
                     f"{s.ok_runs}/{s.runs}"])
    return text_table(head, rows)


VERDICT = {True: "PASS", False: "FAIL", None: "SKIP"}


# --------------------------------------------------------------------------
# --profile: one fastmta send run under py-spy
# --------------------------------------------------------------------------


def py_spy() -> str:
    exe = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if exe is None:
        raise RuntimeError("py-spy not found: pip install py-spy")
    return exe


@dataclass
class ProfileEntry:
    frame: str
    self_pct: float
    total_pct: float


def top_entries(raw: Path, top: int) -> tuple[int, list[ProfileEntry]]:
    """(samples, top entries by self time) from py-spy's raw (collapsed stacks) output.

    A frame is ``function (file:line)``; with ``--function`` the line is the function's first line, so
    one function is one entry. Self = samples where it is the innermost frame; total = samples where it
    is anywhere on the stack (counted once per sample).
    """
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        samples += count
        frames = [f for f in stack.split(";") if f] or ["(no Python frame)"]
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not samples:
        return 0, []
    return samples, [ProfileEntry(f, c / samples * 100, incl[f] / samples * 100) for f, c in own.most_common(top)]


def run_profile(case: str, args: argparse.Namespace, inputs: Inputs, sink: CountingSink, log: Log) -> dict[str, Any]:
    rundir = Path(tempfile.mkdtemp(prefix=f"profile-{case}-", dir=inputs.workdir))
    assert inputs.config is not None
    raw = rundir / "py-spy.txt"
    send = send_command(inputs.spools[case], sink, inputs.config, rundir)
    cmd = [py_spy(), "record", "--subprocesses", "--format", "raw", "--function", "--rate", str(args.profile_rate),
           "--output", str(raw),
           *(["--native"] if args.profile_native else []), "--", *send]
    log("profile: " + " ".join(cmd))
    run = Run(case, 0, inputs.counts[case])
    sink0 = sink.count()
    child = run_child(cmd, args.run_timeout * 2)
    check_send(run, child, rundir, sink, sink0)
    samples, entries = top_entries(raw, args.profile_top) if raw.exists() else (0, [])
    result = {"case": case, "command": cmd, "run": asdict(run), "samples": samples, "raw": str(raw),
              "top": [asdict(e) for e in entries]}
    print(f"Profile of `fastmta send` ({LABELS[case]}, {run.n:,} messages) under py-spy "
          f"({args.profile_rate}/s, --function{', --native' if args.profile_native else ''}; idle excluded): "
          f"{samples:,} samples")
    if run.ok:
        print(f"  under the profiler: {run.msgs_per_s:,.0f} msgs/s, py-spy + fastmta CPU {run.cpu_us_per_msg:,.1f} µs/msg "
              f"(both slowed by sampling: not figures to quote)")
    else:
        print(f"  the run FAILED: {run.failure}")
    print()
    rows = [[e.frame, f"{e.self_pct:.1f}", f"{e.total_pct:.1f}"] for e in entries]
    print(text_table([f"top {len(entries)} by own samples: function (file:first line)", "self %", "total %"], rows))
    if args.keep:
        print(f"\nraw profile (collapsed stacks, for flamegraph.pl or speedscope): {raw}")
    else:
        shutil.rmtree(rundir, ignore_errors=True)
        result["raw"] = None
    return result


# --------------------------------------------------------------------------
# --million: peak RSS and the queue's disk space on a 1,000,000-recipient campaign
# --------------------------------------------------------------------------


def run_million(args: argparse.Namespace, workdir: Path, sink: CountingSink, log: Log) -> tuple[dict[str, Any], list[Check]]:
    n = args.million_n
    t = time.perf_counter()
    spool = workdir / "spool-million"
    job = write_campaign(spool, n, big=False)
    size = first_message_size(job)
    config = fastmta_config(workdir / "fastmta-bench.toml", args.connections)
    log(f"inputs: million: {n:,} recipients, ~{size:,} B each ({time.perf_counter() - t:.1f} s)")
    rundir = Path(tempfile.mkdtemp(prefix="million-", dir=workdir))
    cmd = send_command(spool, sink, config, rundir)
    log("  " + " ".join(cmd[1:]))
    run = Run("million", 0, n)
    sink0 = sink.count()
    child = run_child(cmd, args.run_timeout, sample_dir=rundir / "queue", poll=args.poll)
    check_send(run, child, rundir, sink, sink0)
    end = dir_usage(rundir / "queue")
    left = sorted(str(p.relative_to(rundir / "queue")) for p in (rundir / "queue").rglob("*") if p.is_file())
    disk_peak = max((s.disk for s in child.samples), default=0)
    peak = run.maxrss_bytes or child.maxrss_bytes

    def rss_at(fraction: float) -> int:
        return max((s.rss for s in child.samples if s.t <= fraction * child.wall_s), default=0)

    result = {
        "run": asdict(run), "message_bytes": size, "maxrss_mb": peak / MB,
        "rss_at_quarters_mb": [rss_at(f) / MB for f in (0.25, 0.5, 0.75, 1.0)],
        "queue_disk_peak_mb": disk_peak / MB, "queue_disk_end": asdict(end), "queue_files_left": left[:50],
        "samples": [asdict(s) for s in child.samples],
    }
    rows = [
        ["recipients delivered", f"{run.delivered or 0:,} of {n:,}"],
        ["message size (rendered + signed)", f"{size:,} B"],
        ["msgs/s (spawn to exit)", _fmt(run.msgs_per_s, ",.0f")],
        ["msgs/s (the engine's own, summary)", _fmt(run.extra.get("engine_msgs_per_s"), ",.0f")],
        ["CPU per msg", _fmt(run.cpu_us_per_msg, ",.1f", " µs")],
        ["peak RSS (ru_maxrss; with an intake process, the sum of both)", f"{peak / MB:.1f} MB"],
        ["RSS at 25/50/75/100% of the run (sampled)", " / ".join(f"{x:.1f}" for x in result["rss_at_quarters_mb"]) + " MB"],
        ["queue disk peak (sampled, allocated)", f"{disk_peak / MB:.1f} MB"],
        ["queue disk at the end (allocated / apparent)", f"{end.allocated / MB:.2f} / {end.apparent / MB:.2f} MB "
                                                         f"({end.files} files)"],
    ]
    print(text_table([f"{n:,}-recipient campaign (fastmta send → smtp-sink)", "value"], rows))
    if left:
        print("  files left in the queue: " + ", ".join(left[:10]) + (" ..." if len(left) > 10 else ""))
    # What stays is the exactly-once record: each row's 8-byte key (a rerun of an edited campaign sends only
    # its new rows), in TakenRecords of 1 MB. Bodies and message records must all be gone.
    keys_bytes = 8 * n * 1.01
    limit = args.million_disk_mb * MB + keys_bytes
    bodies_left = [f for f in left if f.startswith("data")]
    out = [
        Check("every recipient delivered, exit status 0", run.ok, run.failure or f"{run.delivered:,}/{n:,}"),
        Check(f"peak RSS <= {GOAL_MILLION_RSS_MB:g} MB", peak <= GOAL_MILLION_RSS_MB * MB, f"{peak / MB:.1f} MB"),
        Check("no message body left in the queue", not bodies_left, ", ".join(bodies_left[:5]) or "none"),
        Check(f"queue disk space released at the end (<= {args.million_disk_mb:g} MB allocated + the row keys, "
              f"8 B a row: {keys_bytes / MB:.1f} MB)",
              end.allocated <= limit, f"{end.allocated / MB:.2f} MB in {end.files} files (peak {disk_peak / MB:.1f} MB)"),
    ]
    if not args.keep:
        shutil.rmtree(rundir, ignore_errors=True)
        shutil.rmtree(spool, ignore_errors=True)
    return result, out


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=None,
                   help="messages per run for postfix, pickup and campaign (default 50000; --quick 2000)")
    p.add_argument("--n-large", type=int, default=None, help="messages per rsa100k run (default 10000; --quick 500)")
    p.add_argument("--runs", type=int, default=None, help="rounds; each runs every case (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="small N, 1 round: a smoke test, not a measurement")
    p.add_argument("--only", default=",".join(CASES),
                   help=f"comma-separated cases to run, of {','.join(CASES)} (default: all)")
    p.add_argument("--connections", type=int, default=CONNECTIONS,
                   help=f"connections to the sink, both MTAs (default {CONNECTIONS})")
    p.add_argument("--postfix-set", action="append", default=[], metavar="NAME=VALUE",
                   help="a main.cf setting for the Postfix instance, over the benchmark's (repeatable)")
    p.add_argument("--profile", action="store_true",
                   help="instead of the benchmark: one fastmta send run (the first fastmta case of --only) under "
                        "py-spy, and its top entries")
    p.add_argument("--profile-top", type=int, default=25, help="entries to print (default 25)")
    p.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames of extensions too)")
    p.add_argument("--million", action="store_true",
                   help="instead of the benchmark: the campaign with --million-n recipients; peak RSS and the "
                        "queue's disk at the end (long)")
    p.add_argument("--million-n", type=int, default=None, help="recipients for --million (default 1000000; --quick 50000)")
    p.add_argument("--million-disk-mb", type=float, default=1.0,
                   help="--million: the queue directory's allocated size at the end that counts as released, beyond the "
                        "8 bytes a row of the exactly-once row keys (default 1 MB)")
    p.add_argument("--poll", type=float, default=0.5, help="--million: RSS/disk sampling interval, s (default 0.5)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where inputs, queues and logs go (default: a new directory under /tmp; it must be on the "
                        "file system you mean to measure and traversable by the postfix user)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (and the raw profile)")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds per run (default: 120 + N/50)")
    p.add_argument("--json", type=Path, help="write medians, every run and the checks here")
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 2000 if args.quick else 50_000
    if args.n_large is None:
        args.n_large = 500 if args.quick else 10_000
    if args.million_n is None:
        args.million_n = 50_000 if args.quick else 1_000_000
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.run_timeout is None:
        args.run_timeout = 120 + max(args.n, args.n_large, args.million_n if args.million else 0) / 50
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in only if c not in CASES]
    if bad or not only:
        p.error(f"--only: unknown case(s) {', '.join(bad) or '(none)'}; choose from {', '.join(CASES)}")
    args.cases = [c for c in CASES if c in only]
    settings = {}
    for item in args.postfix_set:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            p.error(f"--postfix-set wants NAME=VALUE, not {item!r}")
        settings[name.strip()] = value.strip()
    args.postfix_set = settings
    if min(args.n, args.n_large) < DOMAINS:
        p.error(f"--n and --n-large must be at least {DOMAINS} (one message per domain)")
    if args.profile and not any(c in FASTMTA_CASES for c in args.cases):
        p.error("--profile needs a fastmta case in --only (pickup, campaign or rsa100k)")
    return args


def postfix_version() -> str | None:
    with contextlib.suppress(Exception):
        out = subprocess.run([find_tool("postconf"), "-d", "-h", "mail_version"], capture_output=True, text=True,
                             timeout=10, stdin=subprocess.DEVNULL)
        return out.stdout.strip() or None
    return None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cases: list[str] = args.cases
    if args.profile:
        cases = [next(c for c in cases if c in FASTMTA_CASES)]
    elif args.million:
        cases = []
    if POSTFIX in cases and os.geteuid() != 0:
        _log("a private Postfix instance needs root; run as root or leave postfix out of --only")
        return 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-send-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: clean up like Ctrl-C
    doc: dict[str, Any] = {
        "argv": [sys.executable, *sys.argv], "quick": args.quick,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "loadavg_at_start": os.getloadavg(), "postfix": postfix_version()},
    }
    started = time.monotonic()
    failed = False
    result_checks: list[Check] = []
    try:
        with counting_sink(workdir) as sink:
            if args.million:
                doc["million"], result_checks = run_million(args, workdir, sink, _log)
                failed = not doc["million"]["run"]["ok"]
            else:
                inputs = build_inputs(workdir, cases, args, _log)
                if args.profile:
                    doc["profile"] = run_profile(cases[0], args, inputs, sink, _log)
                    failed = not doc["profile"]["run"]["ok"]
                else:
                    runs = rounds(cases, args, inputs, sink)
                    summaries = {c: summarize(runs, c, inputs) for c in cases}
                    result_checks = checks(summaries)
                    report(summaries, runs, args, time.monotonic() - started)
                    failed = any(not r.ok for r in runs) or len(runs) < args.runs * len(cases)
                    doc.update({
                        "n": args.n, "n_large": args.n_large, "runs": args.runs, "connections": args.connections,
                        "domains": DOMAINS, "fastmta_config": inputs.config.read_text() if inputs.config else None,
                        "postfix_main_cf_overrides": postfix_settings(args),
                        "medians": [asdict(s) for s in summaries.values()], "results": [asdict(r) for r in runs],
                    })
    except KeyboardInterrupt:
        _log("interrupted")
        failed = True
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if result_checks:
        print()
        print("Goals (issue 18): pickup and campaign >= 8x Postfix's msgs/s at <= 0.1x its CPU/msg; "
              "rsa100k >= 1,500 msgs/s; --million: peak RSS <= 250 MB, queue disk released")
        for c in result_checks:
            print(f"  {VERDICT[c.ok]}  {c.name}: {c.detail}")
    elapsed = time.monotonic() - started
    load = os.getloadavg()
    print(f"\n{elapsed:.0f} s total; load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"({os.cpu_count()} CPUs)" + ("  [--quick: figures are indicative only]" if args.quick else ""))
    if args.json:
        doc.update({"elapsed_s": elapsed, "loadavg_at_end": load, "checks": [asdict(c) for c in result_checks]})
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n")
    if failed:
        return 1
    return 2 if any(c.ok is False for c in result_checks) else 0


def rounds(cases: list[str], args: argparse.Namespace, inputs: Inputs, sink: CountingSink) -> list[Run]:
    runs: list[Run] = []
    for rnd in range(args.runs):
        order = cases if rnd % 2 == 0 else cases[::-1]
        for case in order:
            _log(f"round {rnd + 1}/{args.runs}: {LABELS[case]} ({inputs.counts[case]:,}) ...")
            try:
                if case == POSTFIX:
                    run = run_postfix(rnd, args, inputs, sink, _log)
                else:
                    run = run_fastmta(case, rnd, args, inputs, sink, _log)
            except Exception as exc:
                run = Run(case, rnd, inputs.counts[case], failure=f"{type(exc).__name__}: {exc}")
            runs.append(run)
            if run.ok:
                rss = f", peak RSS {run.maxrss_bytes / MB:.1f} MB" if run.maxrss_bytes else ""
                _log(f"  {run.msgs_per_s:,.0f} msgs/s, {run.cpu_us_per_msg:,.1f} µs/msg CPU, "
                     f"{run.wall_s:.1f} s{rss}")
            else:
                _log(f"  FAILED: {run.failure}")
    return runs


def report(summaries: dict[str, Summary], runs: list[Run], args: argparse.Namespace, elapsed: float) -> None:
    print(table(summaries))
    print()
    print(f"medians of {args.runs} round(s); {DOMAINS} domains, {args.connections} connections to one smtp-sink; "
          "fastmta: whole process, spawn to exit (start-up included), accounting on; "
          "Postfix: release to the N-th message at the sink, CPU of its process tree")
    pf_runs = [r for r in runs if r.case == POSTFIX and r.ok]
    if pf_runs:
        by_name: dict[str, list[float]] = {}
        for r in pf_runs:
            for k, v in r.extra.get("cpu_by_process_s", {}).items():
                by_name.setdefault(k, []).append(v / r.n * 1e6)
        parts = sorted(((k, statistics.median(v)) for k, v in by_name.items()), key=lambda kv: -kv[1])
        print("  Postfix CPU µs/msg by process: " + ", ".join(f"{k} {v:.1f}" for k, v in parts if v >= 0.05))
        print(f"  Postfix: postsuper -H ALL took {_median([r.extra.get('postsuper_s') for r in pf_runs]):.2f} s "
              f"(in its wall time only if mail left before postqueue -f), injection {_median([r.extra.get('injection_s') for r in pf_runs]):.1f} s")
    for case in FASTMTA_CASES:
        mine = [r for r in runs if r.case == case and r.ok]
        eng = _median([r.extra.get("engine_msgs_per_s") for r in mine])
        if eng:
            print(f"  {case}: the engine's own msgs/s (queue opened to end, from its summary): {eng:,.0f}")
    rsa = summaries.get(RSA100K)
    if rsa is not None and rsa.cpu_us_per_msg and rsa.sink_cpu_us_per_msg is not None:
        budget = CORES * 1e6 / GOAL_RSA_RATE
        sign = rsa_sign_us()
        left = budget - sign - rsa.sink_cpu_us_per_msg
        print(f"  rsa100k budget: {GOAL_RSA_RATE:,.0f} msgs/s on {CORES} cores leaves {budget:,.0f} µs of CPU a message, "
              f"sender and sink together; one RSA-2048 signature takes {sign:,.0f} µs (measured now, the same "
              f"OpenSSL) and smtp-sink {rsa.sink_cpu_us_per_msg:,.0f} µs a message: {left:,.0f} µs left for all else "
              f"(render, hash and journal 100 KB, send it); fastmta uses {rsa.cpu_us_per_msg - sign:,.0f} µs besides "
              f"the signature")
    failed = [r for r in runs if not r.ok]
    if failed:
        print()
        print("Failed runs:")
        for (case, why), k in Counter((r.case, r.failure) for r in failed).items():
            print(f"  {case}: {why}" + (f"  (x{k})" if k > 1 else ""))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main(sys.argv[1:]))
