"""Deliver a spool directory: pickup files (*.eml) and campaign jobs (*.toml).

A pickup file is an RFC 5322 message whose envelope rides in X-Sender: and
X-Receiver: headers (PowerMTA's convention; removed before sending). A
campaign job names a template, a sender, DKIM keys and a recipients file
(CSV or JSONL), rendered per recipient.

Routing comes from DNS (MX) unless --relay or --sink says otherwise, or the
configuration has static routes. Bad input (a malformed file, address or
recipient row) is reported with file, line and reason in the summary and in
--rejects FILE; everything else is delivered.

Everything taken from the spool is first written to a durable queue
(--queue-dir, default SPOOL/.fastmta): a run that is interrupted (Ctrl-C,
a crash, SIGKILL) resumes there when started again, without sending
finished recipients twice. Inputs are known by content, not by name: a
pickup file by the hash of its bytes (touching or renaming it, or the spool
directory, resends nothing), a campaign by its id and each row by its
recipient (appending rows to a finished campaign sends only the new ones; a
recipient twice in a campaign is sent once and the repeat reported, unless
the job sets allow_duplicates). Ctrl-C once: take no new input, finish what
is in flight, exit; twice: exit at once (still recoverable).

The reputation guard ([guard] in the configuration) pauses a campaign whose
hard-bounce or complaint rate is too high, or that draws blocklist replies at
several providers: its recipients stay in the queue, no new input is taken,
the rest is finished, and the run exits 1 naming it. Run again with
--resume-campaign ID (counted afresh) or --override-campaign ID (no brake)
to send the rest. A campaign job may leave out inactive recipients
(sunset_days): each gets an accounting record "sunset".

Exit status: 0 every recipient reached a final state (delivered, bounced or
expired) and no input was rejected; 1 some recipients are not final
(interrupted, the delivery record could not be written, or queued messages were
lost to damage and reported); 3 some input was
rejected; 2 usage or configuration error (a bad option, configuration file or
key, or a queue already in use by another fastmta process).

Examples:
  fastmta send spool/ --sink                            # local sink, nothing leaves the machine
  fastmta send spool/ --relay 127.0.0.1:2525 --accounting acct.jsonl
  fastmta send spool/ --config fastmta.toml
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec

from fastmta.cli import UsageError, parse_duration, parse_hostport
from fastmta.cli.display import Progress
from fastmta.cli.precheck import campaign_checker, precheck
from fastmta.cli.runtime import tune_gc
from fastmta.cli.send_queue import QUEUE_REFUSED, QueueRefused, add_queue_arguments, open_queue
from fastmta.cli.sinkproc import embedded_sink
from fastmta.cli.terminal import safe_text
from fastmta.delivery.accounting import AccountingLog
from fastmta.delivery.config import Config, load_config
from fastmta.delivery.config import parse_hostport as route_hostport
from fastmta.delivery.engine import Engine, EngineClosed
from fastmta.delivery.routing import Router
from fastmta.errors import ConfigError, InputError
from fastmta.feedback.suppression import SqliteSuppressionStore
from fastmta.intake.items import Event, Sunset
from fastmta.intake.process import IntakeError, IntakeProcess, can_fork
from fastmta.intake.progress import InputProgress, resume_from
from fastmta.intake.reader import (
    InputEnd,
    InputSkipped,
    InputStart,
    Reject,
    SpoolItem,
    SpoolReader,
)
from fastmta.intake.rejects import RejectLog
from fastmta.message.returnpath import ReturnPath
from fastmta.message.unsubscribe import Unsubscribe
from fastmta.smtp.model import Body


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spool", type=Path, help="directory with *.eml pickup files and/or *.toml campaign jobs")
    p.add_argument("--config", type=Path, help="configuration file (TOML)")
    p.add_argument("--relay", type=parse_hostport, metavar="HOST:PORT",
                   help="route every domain to this server (overrides DNS and static routes)")
    p.add_argument("--sink", action="store_true",
                   help="start the built-in sink on loopback and route everything to it (nothing leaves the machine)")
    p.add_argument("--accounting", type=Path, metavar="FILE",
                   help="append one JSON line per recipient outcome to FILE")
    p.add_argument("--accounting-format", choices=["jsonl", "csv"],
                   help="accounting format (default: csv for a .csv file name, else JSON lines); "
                        "csv has PowerMTA-like columns (type, timeLogged, orig, rcpt, dsnStatus, bounceCat, ...)")
    p.add_argument("--accounting-rotate-size", type=_size, metavar="BYTES",
                   help="start a new accounting file past this size (e.g. 100M); the old one gets a time suffix")
    p.add_argument("--accounting-rotate-interval", type=parse_duration, metavar="SECONDS",
                   help="start a new accounting file this often (e.g. 1h, 1d)")
    p.add_argument("--rejects", type=Path, metavar="FILE", help="write rejected input (file, line, reason) as JSON lines")
    p.add_argument("--max-lifetime", type=parse_duration, metavar="DURATION",
                   help="expire recipients not delivered after this long: seconds, or 30m, 2h, 5d "
                        "(default: config, 5 days)")
    p.add_argument("--summary-json", type=Path, metavar="FILE", help="also write the final summary as JSON")
    add_queue_arguments(p)
    p.add_argument("--force", action="store_true",
                   help="send campaigns even when `fastmta check` (run on each before it starts) finds errors")
    p.add_argument("--no-check", action="store_true", help="do not run `fastmta check` on campaigns before sending")
    p.add_argument("--suppressions", type=Path, metavar="DB",
                   default=Path(os.environ["FASTMTA_SUPPRESSIONS"]) if os.environ.get("FASTMTA_SUPPRESSIONS") else None,
                   help="check every recipient against this suppression list (SQLite, as `fastmta suppress` and "
                        "fastmta serve keep it; default $FASTMTA_SUPPRESSIONS): a suppressed recipient gets an "
                        "accounting record 'suppressed' and is never sent")
    p.add_argument("--resume-campaign", action="append", default=[], metavar="ID",
                   help="resume a campaign the reputation guard paused in an earlier run (its figures are counted "
                        "afresh: paused again only if what follows is bad too); repeatable")
    p.add_argument("--override-campaign", action="append", default=[], metavar="ID",
                   help="resume a paused campaign and exempt it from the guard's brakes for this run; repeatable")
    p.add_argument("--quiet", "-q", action="store_true", help="no live progress display")
    p.add_argument("--intake", choices=["process", "inline"], default="process" if can_fork() else "inline",
                   help="read, render and sign the spool in a process of its own, on another core (process, the "
                        "default where fork exists), or in the event loop (inline)")


def _size(text: str) -> int:
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
    t = text.strip().upper().removesuffix("B")
    unit = t[-1:] if t[-1:] in "KMG" else ""
    try:
        value = int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 100M") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _effective_config(args: argparse.Namespace, sink: tuple[str, int] | None) -> Config:
    config = load_config(args.config) if args.config else Config()
    data = msgspec.to_builtins(config)
    if sink is not None or args.relay is not None:
        host, port = sink if sink is not None else args.relay
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        data["routing"]["static"] = {"*": [target]}
        # The relays' logins that name this target stay ([routing.auth] for --relay's host); the others
        # would name no route any more.
        to = route_hostport(target, 25)
        data["routing"]["auth"] = {k: v for k, v in data["routing"].get("auth", {}).items()
                                   if (hp := route_hostport(k, 0)).host == to.host and hp.port in (0, to.port)}
    if args.max_lifetime is not None:
        data["queue"]["max_lifetime"] = args.max_lifetime
    if sink is not None:
        # The local sink speaks STARTTLS with a self-signed certificate; TLS
        # adds nothing on loopback, so do not spend the CPU on it.
        data["smtp"]["tls"] = "never"
        # A local sink is not a receiver to be polite to: no adaptive slow start.
        data["sites"] = {"*": {"adaptive": {"enabled": False}}}
    return msgspec.convert(data, Config)


def _return_path(config: Config) -> ReturnPath | None:
    rp = config.return_path
    if not rp.domain:
        return None
    try:
        secret = Path(rp.secret_file).read_bytes().strip()
        return ReturnPath(secret, rp.domain, rp.prefix)
    except (OSError, ValueError) as exc:
        raise UsageError(f"configuration error: return_path: {exc}") from None


def _unsubscribe(config: Config) -> Unsubscribe | None:
    try:
        return config.unsubscribe.build(config.return_path.secret_file)
    except (OSError, ValueError) as exc:
        raise UsageError(f"configuration error: unsubscribe: {exc}") from None


class _Window:
    """At most *size* submits in flight, for one acquiring task (the reading loop).

    ``asyncio.Semaphore`` would do, but its acquire() scans its waiters every
    time (2.4% of a 50,000-file pickup run's CPU in a profile); this is a counter.
    """

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiter: asyncio.Future[None] | None = None

    async def acquire(self) -> None:
        while not self.free:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self.free -= 1

    def release(self) -> None:
        self.free += 1
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _signed_body(sign: Callable[[bytes], bytes], content: bytes) -> Body:
    """Sign *content* and encode its wire form: run on a thread, both mostly outside the GIL."""
    body = Body(sign(content))
    body.data_wire  # noqa: B018 (cached on the body: the connection finds it done)
    return body


def _peak_rss(usage: Any = None) -> int:
    """Peak resident bytes from a ``struct_rusage``, this process's by default: Linux counts kB, macOS bytes."""
    if usage is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
    return int(usage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def _nothing_done(args: argparse.Namespace, queue_dir: Path, fatal: str | None) -> dict[str, Any]:
    """The summary of a run that could not start (same fields as a real one)."""
    zero = ("messages", "recipients", "resumed_recipients", "inputs_already_done", "delivered", "bounced",
            "expired", "suppressed", "sunset", "deferrals", "unfinished")
    return {"spool": str(args.spool), "queue": str(queue_dir), **dict.fromkeys(zero, 0), "rejected": [],
            "paused": [], "guard": None,
            "elapsed_s": 0.0, "recipients_per_s": 0.0, "sites": [], "suspected_filters": [], "interrupted": False,
            "lost": [], "fatal": fatal, "intake_error": None, "peak_rss_bytes": _peak_rss(),
            "intake_peak_rss_bytes": None, "accounting": str(args.accounting) if args.accounting else None,
            "accounting_unwritten": 0}


async def _unresolvable_static_routes(config: Config) -> list[str]:
    """Static route (--relay) hosts that do not resolve: a typo caught before it defers every recipient."""
    router = Router(config)
    try:
        return await router.check_static_routes()
    finally:
        await router.aclose()


def _queue_dir(args: argparse.Namespace, stack: contextlib.ExitStack) -> Path:
    if args.queue_dir is not None:
        return Path(str(args.queue_dir))
    if args.sink:
        # The local sink keeps nothing: resuming into a new one would be
        # meaningless, so a --sink run keeps its queue only while it runs.
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fastmta-queue-")))
    spool_dir: Path = args.spool
    return spool_dir / ".fastmta"


async def _deliver(args: argparse.Namespace, config: Config, progress: Progress, queue_dir: Path) -> dict[str, Any]:
    try:
        accounting = (
            AccountingLog(
                args.accounting, format=args.accounting_format, max_bytes=args.accounting_rotate_size,
                max_age=args.accounting_rotate_interval,
            )
            if args.accounting
            else None
        )
    except OSError as exc:
        raise UsageError(f"--accounting {args.accounting}: {exc.strerror or exc}") from None
    try:
        spool = await asyncio.to_thread(open_queue, queue_dir, args.accept_journal_reset, args.accept_lost_progress)
    except QueueRefused as exc:
        if accounting is not None:
            accounting.close()
        return _nothing_done(args, queue_dir, str(exc))
    if spool.report.damaged:
        progress.note(f"queue recovery: {spool.report}")
    if args.reread_inputs:
        progress.note(f"reading {spool.reread_inputs():,} input(s) again from their first rows: the rows not "
                      "recorded as taken are sent")
    rejects = RejectLog(queue_dir / "rejects.jsonl", progress.note)
    if rejects.earlier:
        progress.note(f"{rejects.earlier:,} input(s) rejected by an earlier run that ended before reporting them: "
                      "reported below")

    def reject(r: Reject) -> None:
        progress.reject(r)
        rejects.add(r)  # before the row is marked taken: a crash cannot lose the report (intake/rejects.py)

    tracker = InputProgress(spool)
    refused: set[Path] = set()
    if not args.no_check:
        checker = campaign_checker(config, relayed=args.sink or args.relay is not None, force=args.force,
                                   note=progress.note)
        refused, refusals = await asyncio.to_thread(precheck, args.spool, checker)
        for refusal in refusals:
            reject(refusal)
    refused_texts = {str(p) for p in refused}
    inline = args.intake == "inline"
    # Inline, costly signatures are left for a thread pool (below); a separate intake process signs them itself.
    reader = SpoolReader(args.spool, resume_from(spool), _return_path(config), unsubscribe=_unsubscribe(config),
                         accept=lambda text: text not in refused_texts, sign_later=inline)
    intake = None if inline else IntakeProcess(iter(reader))
    # RSA signing and hashing release the GIL: on threads they use the other core.
    signing = concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 2), thread_name_prefix="fastmta-sign")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_signal() -> None:
        nonlocal interrupts
        interrupts += 1
        stop.set()
        engine.stop_accepting()  # submits waiting for room give up at once
        if intake is not None:
            intake.kill()  # no more input: and a wait for its next event ends now
        if interrupts >= 2:
            progress.note("second interrupt: exiting now (the queue stays recoverable)")
            os._exit(130)
        progress.note("interrupt: no new work taken; finishing transactions in flight (Ctrl-C again to quit now)")

    engine = Engine(config, accounting=accounting, spool=spool)
    suppressions = None
    if args.suppressions is not None:
        if not args.suppressions.is_file():
            raise UsageError(f"--suppressions {args.suppressions}: no such file (make one with `fastmta suppress`)")
        suppressions = SqliteSuppressionStore(args.suppressions)
        engine.set_suppression(suppressions)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    submitted_messages = 0
    submitted_recipients = 0
    skipped_inputs = 0
    sunsets = 0
    guard_events: list[dict[str, Any]] = []

    def on_guard_event(record: dict[str, Any]) -> None:
        guard_events.append(record)
        if record["status"] == "campaign_paused":
            progress.note(f"reputation guard: campaign {record['campaign']} paused: {record['reason']} "
                          f"(no new input taken; the rest stays queued)")
            stop_input.set()
            if intake is not None:
                intake.kill()
        else:
            progress.note(f"reputation guard: {record['status']}: {record.get('source')} at {record.get('provider')}")
        if accounting is not None:
            accounting.write_record(record)

    engine.guard.on_event = on_guard_event
    stop_input = asyncio.Event()  # a campaign was paused: take no new input, finish the rest
    started = time.perf_counter()
    # Submits in flight at once: each waits for its group commit, so many
    # share one fsync instead of paying one each.
    window = _Window(256)
    intake_failure: str | None = None

    async def events() -> AsyncIterator[Event]:
        nonlocal intake_failure
        if intake is None:
            for event in reader:
                yield event
            return
        try:
            async for event in intake.events():
                yield event
        except IntakeError as exc:
            if stop.is_set() or stop_input.is_set():
                return  # stopped on purpose (Ctrl-C, a paused campaign): killed by us
            # Nothing the child handed over is lost; what it had not is read again by the next run.
            intake_failure = str(exc)
            progress.note(f"reading the spool stopped: {exc}")
    inflight: set[asyncio.Task[None]] = set()

    async def submit(item: SpoolItem) -> None:
        nonlocal submitted_messages, submitted_recipients
        window_held = True
        try:
            content: bytes | Body = item.content
            if item.sign is not None:
                try:
                    content = await loop.run_in_executor(signing, _signed_body, item.sign, item.content)
                except Exception as exc:  # reported as this row's failure, like any bad row: never dropped unseen
                    raise InputError(f"DKIM signing failed: {exc}") from exc
            await engine.submit(content, item.sender, item.recipients, meta=item.meta, take=tracker.take(item))
        except InputError as exc:
            window.release()
            window_held = False
            reject(Reject(item.source, item.line, exc.reason))
            tracker.taken(item.key, item.row)  # reported: not to be read again
        except EngineClosed:
            pass  # interrupted before it was accepted: a rerun reads it again
        else:
            window.release()
            window_held = False
            submitted_messages += 1
            submitted_recipients += len(item.recipients)
            progress.submitted(submitted_messages, submitted_recipients)
            tracker.taken(item.key, item.row)  # durable in the queue
        finally:
            if window_held:
                window.release()

    try:
        if intake is not None:
            # Forked before the engine opens connections and before the display's thread starts: the
            # child inherits no socket to a receiver (which it would keep open after the parent closed it).
            try:
                await intake.start()
            except OSError as exc:  # no process to spare (EAGAIN, ENOMEM): read here, signing too
                progress.note(f"no intake process ({exc.strerror or exc}): reading the spool in this process")
                intake = None
        async with engine:
            if engine.recovered:
                progress.note(f"resuming {engine.recovered:,} unfinished recipient(s) from {queue_dir}")
            for cid in args.resume_campaign:
                done = engine.control.resume(f"campaign:{cid}")
                progress.note(f"campaign {cid}: resumed, {done['released']:,} held recipient(s) released"
                              if done["resumed"] else f"campaign {cid}: was not paused")
            for cid in args.override_campaign:
                done = engine.guard.override(cid)
                progress.note(f"campaign {cid}: resumed without the guard's brakes, "
                              f"{done['released']:,} held recipient(s) released")
            progress.start(engine)
            async for event in events():
                if stop.is_set() or stop_input.is_set() or engine.fatal is not None:
                    break
                if isinstance(event, SpoolItem) and event.meta.get("job") is not None and \
                        engine.control.is_suspended(f"campaign:{event.meta['job']}"):
                    tracker.failed(event.key)  # paused: its rows are read again by a later run
                    continue
                if isinstance(event, Sunset):
                    sunsets += 1
                    if accounting is not None:
                        accounting.write_record(event.as_record(time.time()))
                    tracker.issued(event.key, event.row)
                    tracker.taken(event.key, event.row)
                elif isinstance(event, InputSkipped):
                    skipped_inputs += 1
                elif isinstance(event, InputStart):
                    tracker.start(event.key, event.fingerprint)
                elif isinstance(event, InputEnd):
                    tracker.end(event.key)
                elif isinstance(event, Reject):
                    reject(event)
                    if event.key:
                        if event.row == 0:
                            # The file or job itself (not one of its rows): keep
                            # trying it on later runs, and keep reporting it.
                            tracker.failed(event.key)
                        tracker.issued(event.key, event.row)
                        tracker.taken(event.key, event.row)
                else:
                    await window.acquire()
                    if stop.is_set():
                        window.release()
                        break
                    tracker.issued(event.key, event.row)
                    task = loop.create_task(submit(event))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
            if inflight:
                await asyncio.wait(set(inflight))
            while not stop.is_set() and engine.unfinished and engine.fatal is None:
                held = engine.control.held_waiting()
                if held and engine.unfinished - engine.filters.held <= held:
                    break  # only what a paused campaign holds is left: it waits in the queue for a later run
                waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(engine.drain())}
                if not stop_input.is_set():
                    waiters.add(asyncio.ensure_future(stop_input.wait()))  # a pause: look again
                await asyncio.wait(waiters, timeout=0.5 if held or stop_input.is_set() else None,
                                   return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
            paused = [{"campaign": r["value"], "held": r["held"]} for r in engine.control.rules()
                      if r["kind"] == "campaign"]
        # Read after close(): it finished the transactions that were in flight (the KPIs taken before it
        # counted 19 delivered of an interrupted run's 24).
        unfinished = engine.unfinished + engine.unresumed
        guard = _guard_summary(engine, guard_events)
    finally:
        if intake is not None:
            await intake.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        progress.stop()
        signing.shutdown(cancel_futures=True)
        accounting_failure = None
        if accounting is not None:
            try:
                accounting.close()
            except OSError as exc:  # its disk is full: said, and the queue is closed all the same (below)
                accounting_failure = str(exc)
        if suppressions is not None:
            suppressions.close()
        rejects.close()
        await spool.close()
    elapsed = time.perf_counter() - started
    counts = dict(engine.counts)
    final = counts.get("delivered", 0) + counts.get("bounced", 0) + counts.get("expired", 0)
    return {
        "spool": str(args.spool),
        "queue": str(queue_dir),
        "messages": submitted_messages,
        "recipients": submitted_recipients,
        "resumed_recipients": engine.recovered,
        "inputs_already_done": skipped_inputs,
        "delivered": counts.get("delivered", 0),
        "bounced": counts.get("bounced", 0),
        "expired": counts.get("expired", 0),
        "suppressed": counts.get("suppressed", 0),  # on the suppression list: recorded, never sent
        "sunset": sunsets,  # inactive too long (the campaign's sunset policy): recorded, never sent
        "deferrals": counts.get("deferred", 0),
        "unfinished": unfinished,
        "rejected": rejects.all(),  # this run's, and those an earlier run ended before reporting
        "_reject_log": str(rejects.path),
        "elapsed_s": round(elapsed, 3),
        "recipients_per_s": round(final / elapsed, 1) if elapsed > 0 else 0.0,
        "sites": progress.site_table(engine, limit=None),
        # Domains whose "user unknown" verdicts were held as a filter's (bounce type suspected_filter).
        "suspected_filters": engine.filters.report(),
        "interrupted": stop.is_set(),
        # Campaigns held by the reputation guard (their recipients wait in the queue), and its figures.
        "paused": paused,
        "guard": guard,
        "lost": [
            {"message_id": lost.id, "recipients": lost.recipients, "reason": lost.reason, "meta": lost.meta}
            for lost in engine.lost
        ],
        "fatal": str(engine.fatal) if engine.fatal is not None else accounting_failure,
        # Outcomes with no line in the accounting log (its disk failed): the queue has them, the log does not.
        "accounting_unwritten": accounting.unwritten if accounting is not None else 0,
        # The spool could not be read to its end (--intake process: the reading process failed).
        "intake_error": intake_failure,
        # Peak resident memory of this process and of its intake process (each counts the pages they share).
        "peak_rss_bytes": _peak_rss(),
        "intake_peak_rss_bytes": _peak_rss(intake.rusage) if intake is not None and intake.rusage else None,
        "accounting": str(args.accounting) if args.accounting else None,
    }


def _guard_summary(engine: Engine, events: list[dict[str, Any]]) -> dict[str, Any]:
    """The reputation guard's part of the summary: its events and the KPIs of the run (totals)."""
    kpis = engine.guard.kpis.snapshot()
    return {
        "events": events,
        "sources_out": engine.guard.summary()["sources_out"],
        **{scope: [{k: v for k, v in row.items() if k not in ("1h", "24h", "total")} | row["total"]
                   for row in kpis[scope]] for scope in ("campaigns", "sources", "sender_domains")},
    }


def run(args: argparse.Namespace) -> int:
    if not args.spool.is_dir():
        print(f"fastmta send: {safe_text(args.spool)}: not a directory", file=sys.stderr)
        return 2
    if args.sink and args.relay:
        print("fastmta send: --sink and --relay exclude each other", file=sys.stderr)
        return 2
    for option, path in (("--rejects", args.rejects), ("--summary-json", args.summary_json)):
        # Written at the end: a directory that is not there showed a traceback after every message had gone.
        if path is not None and not os.access(path.parent if str(path.parent) else ".", os.W_OK):
            print(f"fastmta send: {option} {safe_text(path)}: {safe_text(path.parent)} is not a writable directory",
                  file=sys.stderr)
            return 2
    import uvloop

    def go(sink: tuple[str, int] | None) -> dict[str, Any]:
        try:
            config = _effective_config(args, sink)
        except (ConfigError, msgspec.ValidationError) as exc:
            raise UsageError(f"configuration error: {exc}") from None
        _return_path(config)  # a missing or short secret is a configuration error, before anything starts
        _unsubscribe(config)
        if sink is None:
            problems = uvloop.run(_unresolvable_static_routes(config))
            if problems:
                what = "--relay" if args.relay is not None else "a static route"
                raise UsageError(f"configuration error: {what} names a host without an address: {'; '.join(problems)}")
        progress = Progress(enabled=not args.quiet)
        tune_gc()
        with contextlib.ExitStack() as stack:
            queue_dir = _queue_dir(args, stack)
            try:
                summary = uvloop.run(_deliver(args, config, progress, queue_dir))
            except KeyboardInterrupt:
                # Ctrl-C or SIGTERM (fastmta.cli.main makes it one) while the queue opened (recovery) or
                # the spool was checked, before the run's own handlers: nothing was taken.
                progress.stop()
                summary = {**_nothing_done(args, queue_dir, None), "interrupted": True}
                progress.note("interrupted before delivery began: nothing was taken (the queue is unchanged)")
        progress.print_summary(summary)
        return summary

    if args.sink:
        with embedded_sink() as address:
            summary = go(address)
    else:
        summary = go(None)
    reject_log = summary.pop("_reject_log", None)  # only a run that read the queue's rejects marks them
    if args.rejects:
        args.rejects.write_text("".join(json.dumps(r) + "\n" for r in summary["rejected"]))
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    if reject_log is not None:
        RejectLog.mark_reported(Path(reject_log))  # printed and written: reported
    if summary["interrupted"] and not summary["messages"] and not summary["resumed_recipients"]:
        return 1
    if summary.get("accounting_unwritten"):
        print(f"fastmta send: {summary['accounting_unwritten']:,} outcome(s) in all may have no line in the "
              f"accounting log (its disk failed); the queue's journal has them", file=sys.stderr)
    if summary.get("fatal"):
        fatal = safe_text(summary["fatal"])
        print(f"fastmta send: {fatal}" if fatal.startswith(QUEUE_REFUSED) else
              f"fastmta send: stopped: the delivery record could not be kept: {fatal} "
              f"(fix the cause and run again: the queue resumes)", file=sys.stderr)
        return 1
    # Not all read: said first, and the exit status is 1 whatever follows (the rest is read by a rerun).
    unread = bool(summary["intake_error"])
    if unread:
        print(f"fastmta send: stopped reading the spool: {safe_text(summary['intake_error'])} (what was taken is "
              f"delivered; run again to read the rest)", file=sys.stderr)
    if summary["lost"]:
        print(f"fastmta send: {len(summary['lost'])} accepted message(s) could not be recovered from the queue "
              f"(accounted with status 'lost'); those lost with their record (not their body) are sent by "
              f"`fastmta send --reread-inputs` (it sends only rows not recorded as taken)", file=sys.stderr)
        return 1
    for p in summary["paused"]:
        print(f"fastmta send: campaign {safe_text(p['campaign'])} is paused by the reputation guard; its "
              f"{p['held']:,} held recipient(s) stay in the queue: run again with --resume-campaign "
              f"{safe_text(p['campaign'])} (or --override-campaign) to send them", file=sys.stderr)
    if summary["unfinished"]:
        print(f"fastmta send: {summary['unfinished']} recipient(s) did not reach a final state", file=sys.stderr)
        return 1
    if summary["rejected"]:
        print(f"fastmta send: {len(summary['rejected'])} input item(s) rejected (see above)", file=sys.stderr)
    if unread:
        return 1
    return 3 if summary["rejected"] else 0
