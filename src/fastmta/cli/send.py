"""Deliver a spool directory: pickup files (*.eml) and campaign jobs (*.toml).

A pickup file is an RFC 5322 message whose envelope rides in X-Sender: and
X-Receiver: headers (PowerMTA's convention; removed before sending). A
campaign job names a template, a sender, DKIM keys and a recipients file
(CSV or JSONL), rendered per recipient.

Routing comes from DNS (MX) unless --relay or --sink says otherwise, or the
configuration has static routes. Bad input (a malformed file, address or
recipient row) is reported with file, line and reason in the summary and in
--rejects FILE; everything else is delivered.

Exit status: 0 every recipient reached a final state (delivered, bounced or
expired) and no input was rejected; 1 some recipients are not final
(interrupted); 3 some input was rejected; 2 usage or configuration error.

Examples:
  fastmta send examples/spool --sink                    # local sink, nothing leaves the machine
  fastmta send spool/ --relay 127.0.0.1:2525 --accounting acct.jsonl
  fastmta send spool/ --config fastmta.toml
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from fastmta.accounting import AccountingLog
from fastmta.cli.display import Progress
from fastmta.cli.load import parse_hostport
from fastmta.cli.sinkproc import embedded_sink
from fastmta.config import Config, load_config
from fastmta.engine import Engine
from fastmta.errors import ConfigError, InputError
from fastmta.spool_input import Reject, SpoolReader


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spool", type=Path, help="directory with *.eml pickup files and/or *.toml campaign jobs")
    p.add_argument("--config", type=Path, help="configuration file (TOML)")
    p.add_argument("--relay", type=parse_hostport, metavar="HOST:PORT",
                   help="route every domain to this server (overrides DNS and static routes)")
    p.add_argument("--sink", action="store_true",
                   help="start the built-in sink on loopback and route everything to it (nothing leaves the machine)")
    p.add_argument("--accounting", type=Path, metavar="FILE",
                   help="append one JSON line per recipient outcome to FILE")
    p.add_argument("--rejects", type=Path, metavar="FILE", help="write rejected input (file, line, reason) as JSON lines")
    p.add_argument("--max-lifetime", type=float, metavar="SECONDS",
                   help="expire recipients not delivered after this long (default: config, 5 days)")
    p.add_argument("--summary-json", type=Path, metavar="FILE", help="also write the final summary as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no live progress display")


def _effective_config(args: argparse.Namespace, sink: tuple[str, int] | None) -> Config:
    config = load_config(args.config) if args.config else Config()
    data = msgspec.to_builtins(config)
    if sink is not None or args.relay is not None:
        host, port = sink if sink is not None else args.relay
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        data["routing"]["static"] = {"*": [target]}
    if args.max_lifetime is not None:
        data["queue"]["max_lifetime"] = args.max_lifetime
    if sink is not None:
        # The local sink speaks STARTTLS with a self-signed certificate; TLS
        # adds nothing on loopback, so do not spend the CPU on it.
        data["smtp"]["tls"] = "never"
        # A local sink is not a receiver to be polite to: no adaptive slow start.
        data["sites"] = {"*": {"adaptive": {"enabled": False}}}
    return msgspec.convert(data, Config)


async def _deliver(args: argparse.Namespace, config: Config, progress: Progress) -> dict[str, Any]:
    accounting = AccountingLog(args.accounting) if args.accounting else None
    reader = SpoolReader(args.spool)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_signal() -> None:
        nonlocal interrupts
        interrupts += 1
        stop.set()
        if interrupts >= 2:
            progress.note("second interrupt: exiting now")
            raise SystemExit(130)
        progress.note("interrupt: no new work taken; finishing transactions in flight (Ctrl-C again to quit now)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    submitted_messages = 0
    submitted_recipients = 0
    started = time.perf_counter()
    engine = Engine(config, accounting=accounting)
    try:
        async with engine:
            progress.start(engine)
            for item in reader:
                if stop.is_set():
                    break
                if isinstance(item, Reject):
                    progress.reject(item)
                    continue
                try:
                    await engine.submit(item.content, item.sender, item.recipients, meta=item.meta)
                except InputError as exc:
                    progress.reject(Reject(item.source, item.line, exc.reason))
                    continue
                submitted_messages += 1
                submitted_recipients += len(item.recipients)
                progress.submitted(submitted_messages, submitted_recipients)
            while not stop.is_set() and engine.unfinished:
                waiter = asyncio.ensure_future(stop.wait())
                drained = asyncio.ensure_future(engine.drain())
                await asyncio.wait({waiter, drained}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                drained.cancel()
            unfinished = engine.unfinished
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        progress.stop()
        if accounting is not None:
            accounting.close()
    elapsed = time.perf_counter() - started
    counts = dict(engine.counts)
    final = counts.get("delivered", 0) + counts.get("bounced", 0) + counts.get("expired", 0)
    return {
        "spool": str(args.spool),
        "messages": submitted_messages,
        "recipients": submitted_recipients,
        "delivered": counts.get("delivered", 0),
        "bounced": counts.get("bounced", 0),
        "expired": counts.get("expired", 0),
        "deferrals": counts.get("deferred", 0),
        "unfinished": unfinished,
        "rejected": [r.as_dict() for r in progress.rejects],
        "elapsed_s": round(elapsed, 3),
        "recipients_per_s": round(final / elapsed, 1) if elapsed > 0 else 0.0,
        "sites": progress.site_table(engine, limit=None),
        "interrupted": stop.is_set(),
        "accounting": str(args.accounting) if args.accounting else None,
    }


def run(args: argparse.Namespace) -> int:
    if not args.spool.is_dir():
        print(f"fastmta send: {args.spool}: not a directory", file=sys.stderr)
        return 2
    if args.sink and args.relay:
        print("fastmta send: --sink and --relay exclude each other", file=sys.stderr)
        return 2
    import uvloop

    def go(sink: tuple[str, int] | None) -> dict[str, Any]:
        try:
            config = _effective_config(args, sink)
        except (ConfigError, msgspec.ValidationError) as exc:
            raise SystemExit(f"fastmta send: configuration error: {exc}") from None
        progress = Progress(enabled=not args.quiet)
        summary = uvloop.run(_deliver(args, config, progress))
        progress.print_summary(summary)
        return summary

    if args.sink:
        with embedded_sink() as address:
            summary = go(address)
    else:
        summary = go(None)
    if args.rejects:
        args.rejects.write_text("".join(json.dumps(r) + "\n" for r in summary["rejected"]))
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    if summary["unfinished"]:
        print(f"fastmta send: {summary['unfinished']} recipient(s) did not reach a final state", file=sys.stderr)
        return 1
    if summary["rejected"]:
        print(f"fastmta send: {len(summary['rejected'])} input item(s) rejected (see above)", file=sys.stderr)
        return 3
    return 0
