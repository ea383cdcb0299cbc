#!/usr/bin/env python3
"""One-click unsubscribe throughput: RFC 8058 POSTs answered only after the suppression is on disk.

Issue 15, item 4. Everything on loopback, three processes:

* the **server** (a child: ``--serve``): an aiohttp app on uvloop with
  ``fastmta.serve.unsubscribe.add_unsubscribe_routes`` and a
  :class:`SuppressionWriter` over a fresh :class:`SqliteSuppressionStore`
  (WAL, synchronous=FULL). A POST is answered 200 only once its
  suppression is committed; concurrent POSTs share one transaction (group
  commit), which runs on the writer's thread, off the event loop;
* the **load client** (a child: ``--client``): aiohttp with ``--connections``
  keep-alive connections (default 50), each POSTing
  ``List-Unsubscribe=One-Click`` (form-encoded, as Gmail sends it) to
  ``/u/TOKEN``, one distinct recipient per request, as fast as answers come;
* this script, which makes the tokens, starts both, and afterwards opens the
  database itself to check that every request answered 200 left its
  suppression there (durability is part of the figure, not assumed).

Each run starts a new server on a new database; the figure is the median of
``--runs`` (default 3) runs. PASS when the median reaches ``--target``
requests/s (default 2,000, the issue's figure for 2 cores).

Usage:
  python bench/bench_unsubscribe.py                 # 3 runs of 20,000 requests
  python bench/bench_unsubscribe.py --quick         # 3 runs of 3,000 requests, seconds
  python bench/bench_unsubscribe.py --json out.json

Exit status: 0 every run completed and the check passed; 1 a run failed
(server or client crashed, a request failed, a suppression missing); 2 the
throughput check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SECRET = b"bench-unsubscribe-secret-0123456789"
BASE = "https://u.bench.example"
LIST_TAG = "bench-2026"


# --- server (child) ------------------------------------------------------------------------------


async def _serve(db: Path, port_file: Path) -> None:
    import signal

    from aiohttp import web

    from fastmta.delivery.accounting import AccountingLog
    from fastmta.message.unsubscribe import Unsubscribe
    from fastmta.serve.feedback_loop import FeedbackLoop
    from fastmta.serve.unsubscribe import add_unsubscribe_routes

    # What fastmta serve runs: the feedback loop's batched writer into DATA_DIR/suppression.db, and an
    # accounting record (unsubscribe) for each one, as the service writes them.
    accounting = AccountingLog(db.parent / "accounting.jsonl")
    writer = FeedbackLoop(db.parent, emit=accounting.write_record)
    await writer.start()
    app = web.Application()
    add_unsubscribe_routes(app, Unsubscribe(SECRET, BASE), writer.record_unsubscribe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(runner.addresses[0][1]))
    tmp.rename(port_file)
    await stop.wait()
    await runner.cleanup()
    await writer.close()
    accounting.close()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    stats = {"commits": writer.commits, "recorded": writer.counts.get("unsubscribe", 0),
             "cpu_s": cpu.ru_utime + cpu.ru_stime}
    port_file.with_suffix(".stats").write_text(json.dumps(stats))


# --- load client (child) ---------------------------------------------------------------------------


async def _client(url: str, tokens_file: Path, connections: int, out: Path) -> None:
    import aiohttp

    tokens = tokens_file.read_text().split()
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    ok: list[str] = []
    next_i = 0
    body = b"List-Unsubscribe=One-Click"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal next_i
            while next_i < len(tokens):
                token = tokens[next_i]
                next_i += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{url}/u/{token}", data=body, headers=headers) as r:
                        await r.read()
                        status = r.status
                except aiohttp.ClientError:
                    status = 0
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    ok.append(token)

        # Timed from the first request: connection set-up is part of the figure.
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    out.write_text(json.dumps({
        "requests": len(tokens), "elapsed_s": elapsed, "statuses": {str(k): v for k, v in statuses.items()},
        "ok_tokens": len(ok),
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else None,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else None,
        "cpu_s": cpu.ru_utime + cpu.ru_stime,
    }))


# --- orchestration ---------------------------------------------------------------------------------


def _one_run(n: int, connections: int, work: Path, index: int, timeout: float) -> dict[str, Any]:
    from fastmta.feedback.suppression import SqliteSuppressionStore
    from fastmta.message.unsubscribe import Unsubscribe

    run_dir = work / f"run{index}"
    run_dir.mkdir()
    u = Unsubscribe(SECRET, BASE)
    tokens = [u.token(LIST_TAG, f"user{index}-{i}@r{i % 100}.bench.example") for i in range(n)]
    (run_dir / "tokens.txt").write_text("\n".join(tokens))
    db = run_dir / "suppression.db"  # DATA_DIR/suppression.db, as fastmta serve keeps it
    port_file = run_dir / "port"
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(db), str(port_file)])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        out = run_dir / "client.json"
        client = subprocess.run([sys.executable, __file__, "--client", url, str(run_dir / "tokens.txt"),
                                 str(connections), str(out)], timeout=timeout)
        if client.returncode != 0:
            raise RuntimeError(f"the client failed (exit {client.returncode})")
        result: dict[str, Any] = json.loads(out.read_text())
    finally:
        server.terminate()
        server.wait(timeout=30)
    stats_file = port_file.with_suffix(".stats")
    if stats_file.exists():
        result["server"] = json.loads(stats_file.read_text())
    # Durability: every request answered 200 is a suppression in the database (a new connection reads it).
    store = SqliteSuppressionStore(db)
    try:
        stored = sum(1 for s in store.entries() if s.value == LIST_TAG)
    finally:
        store.close()
    result["stored"] = stored
    result["rate"] = result["ok_tokens"] / result["elapsed_s"] if result["elapsed_s"] > 0 else 0.0
    return result


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3,000 requests a run: checks that it works")
    ap.add_argument("--requests", type=int, help="requests a run (default 20,000; --quick 3,000)")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--target", type=float, default=2000.0, help="requests/s the median must reach")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one client run may take")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--serve", nargs=2, metavar=("DB", "PORT_FILE"), help=argparse.SUPPRESS)
    ap.add_argument("--client", nargs=4, metavar=("URL", "TOKENS", "CONNECTIONS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import uvloop

    if args.serve:
        uvloop.run(_serve(Path(args.serve[0]), Path(args.serve[1])))
        return 0
    if args.client:
        url, tokens, connections, out = args.client
        uvloop.run(_client(url, Path(tokens), int(connections), Path(out)))
        return 0

    n = args.requests or (3000 if args.quick else 20000)
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-unsub-") as tmp:
        for i in range(args.runs):
            try:
                r = _one_run(n, args.connections, Path(tmp), i, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                failures.append(f"run {i + 1}: {exc}")
                continue
            runs.append(r)
            if r["ok_tokens"] != n:
                failures.append(f"run {i + 1}: {n - r['ok_tokens']} request(s) not answered 200: {r['statuses']}")
            if r["stored"] != r["ok_tokens"]:
                failures.append(f"run {i + 1}: {r['ok_tokens']} answered 200 but {r['stored']} stored")

    print(f"one-click unsubscribe: {n:,} POSTs a run, {args.connections} connections, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"{'run':>4} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'commits':>8} {'per commit':>10} "
          f"{'server cpu s':>12} {'client cpu s':>12} {'stored':>8}")
    for i, r in enumerate(runs, 1):
        server = r.get("server", {})
        commits = server.get("commits", 0)
        print(f"{i:>4} {r['rate']:>8,.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {commits:>8,} "
              f"{(r['ok_tokens'] / commits if commits else 0):>10.1f} {server.get('cpu_s', 0):>12.2f} "
              f"{r['cpu_s']:>12.2f} {r['stored']:>8,}")
    median = statistics.median(r["rate"] for r in runs) if runs else 0.0
    passed = bool(runs) and median >= args.target
    print(f"{'PASS' if passed else 'FAIL'}  median {median:,.0f} requests/s (target {args.target:,.0f}), "
          f"each answered after its suppression was committed")
    for f in failures:
        print(f"FAIL  {f}")
    doc = {
        "benchmark": "unsubscribe",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg": os.getloadavg()},
        "requests_per_run": n, "connections": args.connections, "runs": runs,
        "median_requests_per_s": median, "target": args.target, "passed": passed, "failures": failures,
    }
    print(json.dumps(doc, indent=1))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if failures:
        return 1
    return 0 if passed else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
