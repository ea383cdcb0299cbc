#!/usr/bin/env python3
"""The suppression check at intake, with 1,000,000 suppressed addresses, against the same check with none.

Issue 15, acceptance 2: every recipient that enters fastmta (campaign rows,
pickup, SMTP, HTTP, ``submit()``) passes :meth:`Screen.admit` before it is
queued. This script builds a real SQLite suppression store with N (default
1,000,000) suppressed addresses over 100 domains, opens it as the service
does (the in-memory filter is built from the database), and times
``Screen.admit`` on R (default 200,000) one-recipient messages of
*unsuppressed* addresses (the common case), in the same run as the same
calls on an empty store. It also reports the cost of a hit (a suppressed
recipient: a database query and its accounting record) and the time to open
the big store. Medians of --runs runs.

Goal: the extra cost per recipient with the big list <= 2 us.

Usage:
  python bench/bench_suppression.py                 # 1,000,000 suppressed
  python bench/bench_suppression.py --quick         # 100,000 suppressed, fewer recipients
  python bench/bench_suppression.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fastmta.delivery.screen import Screen
from fastmta.feedback.suppression import SqliteSuppressionStore

GOAL_US = 2.0
MESSAGE = b"From: News <news@sender.example>\r\nTo: x\r\nSubject: hello\r\n\r\nhi\r\n"


def build(path: Path, n: int) -> float:
    """N suppressions written straight into the store's schema (as `fastmta suppress import` would)."""
    SqliteSuppressionStore(path).close()  # the schema
    t = time.perf_counter()
    db = sqlite3.connect(str(path))
    now = time.time()
    db.executemany(
        "INSERT INTO suppression (address, scope, value, reason, source, created, expires) VALUES (?,?,?,?,?,?,NULL)",
        ((f"gone{i}@d{i % 100}.example", "global", "", "hard bounce", "import", now) for i in range(n)),
    )
    db.commit()
    db.close()
    return time.perf_counter() - t


def time_admit(store: SqliteSuppressionStore, addresses: list[str]) -> float:
    """Seconds per recipient of Screen.admit over *addresses* (one recipient per message, as a campaign submits)."""
    records = []
    screen = Screen(store, records.append)
    meta = {"job": "spring"}
    t = time.perf_counter()
    for a in addresses:
        screen.admit("m", "news@sender.example", [a], MESSAGE, meta)
    elapsed = time.perf_counter() - t
    return elapsed / len(addresses)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suppressed", type=int, default=1_000_000)
    p.add_argument("--recipients", type=int, default=200_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.quick:
        args.suppressed, args.recipients, args.runs = 100_000, 50_000, 3
    with tempfile.TemporaryDirectory(prefix="fastmta-bench-supp-") as tmp:
        big_path, empty_path = Path(tmp) / "big.db", Path(tmp) / "empty.db"
        fill_s = build(big_path, args.suppressed)
        t = time.perf_counter()
        big = SqliteSuppressionStore(big_path)
        open_s = time.perf_counter() - t
        empty = SqliteSuppressionStore(empty_path)
        live = [f"reader{i}@d{i % 100}.example" for i in range(args.recipients)]
        hits = [f"gone{i}@d{i % 100}.example" for i in range(0, args.suppressed, max(1, args.suppressed // 2000))]
        with_list, without, hit = [], [], []
        for _ in range(args.runs):  # interleaved: the same noise for both
            without.append(time_admit(empty, live))
            with_list.append(time_admit(big, live))
            hit.append(time_admit(big, hits))
        big.close()
        empty.close()
    med_with, med_without, med_hit = (statistics.median(x) * 1e6 for x in (with_list, without, hit))
    extra = med_with - med_without
    result = {
        "suppressed": args.suppressed, "recipients": args.recipients, "runs": args.runs,
        "admit_us_no_list": round(med_without, 3), "admit_us_with_list": round(med_with, 3),
        "extra_us_per_recipient": round(extra, 3), "hit_us": round(med_hit, 1),
        "store_open_s": round(open_s, 2), "fill_s": round(fill_s, 2), "goal_us": GOAL_US,
        "pass": med_with <= GOAL_US, "python": platform.python_version(),
    }
    print(f"{'what':<48}{'us/recipient':>14}")
    print(f"{'admit, empty suppression store':<48}{med_without:>14.3f}")
    print(f"{f'admit, {args.suppressed:,} suppressed (not on the list)':<48}{med_with:>14.3f}")
    print(f"{'  extra cost of the list':<48}{extra:>14.3f}")
    print(f"{'admit of a suppressed recipient (query+record)':<48}{med_hit:>14.1f}")
    print(f"store open with {args.suppressed:,} rows: {open_s:.2f} s (filter built from the database)")
    verdict = "PASS" if result["pass"] else "FAIL"
    print(f"{verdict}: the whole check with the list costs {med_with:.2f} us per recipient (goal <= {GOAL_US} us)")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["pass"] else 2


if __name__ == "__main__":
    sys.exit(main())
