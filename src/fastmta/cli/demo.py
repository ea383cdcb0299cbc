"""Run the main job on the bundled example: deliver it to a built-in local sink.

Copies the example spool that ships with fastmta (a 10,000-recipient
DKIM-signed campaign and three pickup files, all on reserved .example
domains) into DIR, then runs `fastmta send DIR/spool --sink` on it: a local
sink on 127.0.0.1 receives everything, nothing leaves the machine. Progress
is shown live; at the end a summary is printed and written to
DIR/summary.json, and the record of every recipient to DIR/accounting.jsonl.

DIR defaults to ./fastmta-demo, or to a new directory under the system's
temporary directory when the current one is not writable.

Exit status: as `fastmta send` (0 when every recipient reached a final state).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from fastmta.cli import UsageError, send
from fastmta.examples import SPOOL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, metavar="DIR",
                   help="where the example, summary and accounting go (default ./fastmta-demo)")
    p.add_argument("--quiet", "-q", action="store_true", help="no live progress display")


def _work_dir(chosen: Path | None) -> Path:
    if chosen is not None:
        return chosen
    if os.access(Path.cwd(), os.W_OK):
        return Path.cwd() / "fastmta-demo"
    return Path(tempfile.mkdtemp(prefix="fastmta-demo-"))


def run(args: argparse.Namespace) -> int:
    work = _work_dir(args.dir)
    spool = work / "spool"
    try:
        # A previous demo's results: start again from the shipped example
        # (the accounting log appends, so an old one would mix two runs).
        if spool.exists():
            shutil.rmtree(spool)
        for old in ("accounting.jsonl", "summary.json"):
            (work / old).unlink(missing_ok=True)
        shutil.copytree(SPOOL, spool, ignore=shutil.ignore_patterns(".fastmta", "__pycache__"))
    except OSError as exc:
        raise UsageError(f"cannot copy the example into {work}: {exc.strerror or exc}") from None
    print(f"fastmta demo: delivering the example in {spool} to a local sink")
    parser = argparse.ArgumentParser(prog="fastmta send")
    send.add_arguments(parser)
    argv = [str(spool), "--sink", "--accounting", str(work / "accounting.jsonl"),
            "--summary-json", str(work / "summary.json")]
    if args.quiet:
        argv.append("--quiet")
    code = send.run(parser.parse_args(argv))
    print(f"fastmta demo: summary in {work / 'summary.json'}, every recipient's record in {work / 'accounting.jsonl'}")
    return code
