"""Load-test an SMTP server with generated messages; latency per phase in HDR-style histograms.

Closed loop (default): --connections C connections, each reusing its connection
and pipelining (one round trip per message), as fast as the server goes.
Open loop (--rate R): message i is due at a fixed time (R per second, after an
optional linear --ramp from 0); latencies are measured from that intended time,
so a stalling server cannot hide behind the client waiting for it.
Stop after --messages N or --duration S (whichever comes first).

Phases measured: queue (open loop: due -> handed to a connection), connect,
greeting, ehlo (incl. STARTTLS), envelope (MAIL..354), end_of_data (354 ->
final reply) and message (due -> outcome). Report: throughput, p50/p90/p99/
p99.9 per phase, replies and errors by code; --json prints the report as one
object (schema: `fastmta load --schema`, also fastmta/load_schema.py);
--plot FILE.png draws throughput and latency over time (needs matplotlib).

Sizes (--size): 2048, 20k, uniform:1k:20k, lognormal:4k:1.0 (median, sigma),
choice:2k@80,20k@15,200k@5 (weighted).

Exit status: 0 every message sent and accepted in time, 1 otherwise, 2 bad usage.

Examples:
  fastmta load 127.0.0.1:2525 --messages 20000 --connections 10 --size 2048
  fastmta load --sink --messages 20000                # against a fresh local `fastmta sink`
  fastmta load --sink --rate 1000 --duration 30 --plot run.png
  fastmta load HOST:25 --rate 200 --ramp 10 --duration 60 --size lognormal:8k:1 \\
      --recipients 3 --domains 50 --template --dkim-key key.pem --dkim-domain example.com --dkim-selector s1
  fastmta load --sink --messages 100000 --connections 20 --workers 2 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fastmta.cli import parse_hostport
from fastmta.cli.sinkproc import embedded_sink
from fastmta.load.driver import run_load
from fastmta.load.processes import run_load_processes
from fastmta.load.report import PERCENTILES, PHASES, LoadResult, Progress
from fastmta.load.spec import DkimOptions, LoadSpec, SizeDistribution
from fastmta.smtp.protocol import TLSPolicy


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return x


def _size(value: str) -> SizeDistribution:
    try:
        return SizeDistribution.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", type=parse_hostport, help="server as HOST:PORT (port defaults to 25)")
    p.add_argument("--sink", action="store_true", help="start a local `fastmta sink` on 127.0.0.1 and load it")
    g = p.add_argument_group("how much, how fast")
    g.add_argument("--messages", "-m", type=int, default=None,
                   help="messages to send (default 10000, or no limit with --duration)")
    g.add_argument("--duration", type=_positive_float, metavar="SECONDS", help="offer load for this long")
    g.add_argument("--rate", type=_positive_float, metavar="MSGS_PER_S",
                   help="open loop: this many messages per second, latency from each message's due time "
                        "(default: closed loop, as fast as possible)")
    g.add_argument("--ramp", type=float, default=0.0, metavar="SECONDS",
                   help="open loop: ramp the rate linearly from 0 over this many seconds (default 0)")
    g.add_argument("--connections", "-c", type=_positive, default=10,
                   help="concurrent connections (default 10; open loop: the most that may be busy at once)")
    g.add_argument("--workers", "-w", type=_positive, default=1,
                   help="spread the load over N processes (messages, connections and rate divided; default 1)")
    g.add_argument("--depth", type=_positive, default=2, help="transactions in flight per connection (default 2)")
    g.add_argument("--per-connection", type=int, default=0, metavar="N",
                   help="open a new connection after N messages (1: one message per connection; "
                        "default 0: reuse without limit)")
    w = p.add_argument_group("workload")
    w.add_argument("--size", "-s", type=_size, default=SizeDistribution.fixed(2048),
                   help="message size in bytes, fixed (2048, 20k) or a distribution: uniform:1k:20k, "
                        "lognormal:MEDIAN:SIGMA, choice:2k@80,20k@20 (default 2048)")
    w.add_argument("--recipients", "-r", type=_positive, default=1, help="recipients per message (default 1)")
    w.add_argument("--domains", "-d", type=_positive, default=1, help="spread recipients over N domains (default 1)")
    w.add_argument("--template", action="store_true",
                   help="render a realistic newsletter (text + HTML, merge fields) per message with the "
                        "compiled template engine; --size is then approximate")
    w.add_argument("--dkim-key", metavar="PEM", help="DKIM-sign every message with this RSA or Ed25519 key")
    w.add_argument("--dkim-domain", default="fastmta.test", help="DKIM d= (default fastmta.test)")
    w.add_argument("--dkim-selector", default="load", help="DKIM s= (default load)")
    w.add_argument("--seed", type=int, default=1, help="seed for size distributions (default 1)")
    s = p.add_argument_group("SMTP session")
    s.add_argument("--no-pipelining", action="store_true", help="lock-step even when the server offers PIPELINING")
    s.add_argument("--bdat", action="store_true", help="use BDAT (CHUNKING) when offered instead of DATA")
    s.add_argument("--starttls", choices=[t.value for t in TLSPolicy], default="never",
                   help="STARTTLS policy (default never; the server certificate is not verified in load tests)")
    s.add_argument("--source", metavar="ADDR", help="bind connections to this local address")
    s.add_argument("--helo", default="load.fastmta.test", help="EHLO name (default load.fastmta.test)")
    s.add_argument("--from", dest="sender", default="load@fastmta.test", help="envelope sender")
    s.add_argument("--timeout", type=float, default=None,
                   help="stop after this many seconds whatever happens (default: the schedule's length "
                        "(--duration, or --messages / --rate) + --reply-timeout + 5; 300 for a closed-loop count)")
    s.add_argument("--reply-timeout", type=float, default=30.0, help="seconds to wait for each reply (default 30)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the report as one JSON object (see --schema)")
    o.add_argument("--plot", metavar="FILE.png", help="draw throughput and latency over time (needs matplotlib)")
    o.add_argument("--interval", type=_positive_float, default=1.0,
                   help="time-series resolution in seconds for --plot and the JSON series (default 1)")
    o.add_argument("--schema", action="store_true", help="print the JSON Schema of the --json report and exit")
    o.add_argument("--quiet", "-q", action="store_true", help="no live display")


def _progress_line(p: Progress) -> None:
    of = f"/{p.requested}" if p.requested is not None else ""
    classes = "  ".join(f"{k} {v}" for k, v in sorted(p.reply_classes.items())) or "no replies"
    sys.stderr.write(
        f"\r{p.elapsed_s:6.1f}s  sent {p.sent}{of}  {p.sent_per_s:,.0f}/s  {classes}  "
        f"p50 {p.p50_ms:.2f} ms  p99 {p.p99_ms:.2f} ms  conn errors {p.connect_failures}   "
    )
    sys.stderr.flush()


def _summary(r: LoadResult) -> str:
    requested = f" / {r.messages_requested} requested" if r.messages_requested is not None else ""
    lines = [
        f"target              {r.target}",
        f"mode                {r.mode} loop, {r.connections} connections, {r.workers} process(es)",
        f"messages            {r.messages_accepted} accepted / {r.messages_attempted} sent{requested}",
        f"recipients          {r.recipients_accepted} accepted, {r.recipients_refused} refused",
        f"elapsed             {r.elapsed_s:.2f} s",
        f"throughput          {r.messages_per_s:,.0f} messages/s",
    ]
    if r.rate_target is not None:
        achieved = r.rate_achieved or 0.0
        lines.append(
            f"rate                {achieved:,.1f} of {r.rate_target:,.1f} messages/s "
            f"({100 * achieved / r.rate_target:.1f} %, over {r.rate_window_s:.1f} s after the ramp)"
        )
    if r.messages_unsent:
        lines.append(f"unsent              {r.messages_unsent} messages were due but never sent")
    lines += [
        f"client CPU          {r.cpu_us_per_message:.1f} us/message ({r.cpu_s:.2f} s)",
        f"connections         {r.connections_opened} opened, {r.connect_failures} failed",
        "replies             " + (", ".join(f"{k}: {v}" for k, v in sorted(r.replies.items())) or "none"),
        "failed by code      " + (", ".join(f"{k}: {v}" for k, v in sorted(r.errors_by_code.items())) or "none"),
    ]
    if any(r.histograms[phase].count for phase in PHASES):
        lines += ["", "latency (ms)        " + "".join(f"{h:>10}" for h in ("count", "p50", "p90", "p99", "p99.9", "max"))]
    for phase in PHASES:
        stats = r.latency_ms(phase)
        if not stats["count"]:
            continue
        cells = [f"{int(stats['count']):>10}"] + [f"{stats[k]:>10.2f}" for k in
                                                  ("p50", "p90", "p99", "p99_9", "max")]
        lines.append(f"  {phase:<18}" + "".join(cells))
    for reason, count in sorted(r.errors.items(), key=lambda kv: -kv[1]):
        lines.append(f"error               {count} x {reason}")
    if r.timed_out:
        lines.append("TIMED OUT           the run hit --timeout before all messages were sent")
    return "\n".join(lines)


def _spec(args: argparse.Namespace, host: str, port: int) -> LoadSpec:
    messages = args.messages
    if messages is None and args.duration is None:
        messages = 10_000
    size = args.size
    return LoadSpec(
        host=host, port=port, messages=messages, connections=args.connections,
        size=size.values[0] if size.kind == "fixed" else size, recipients=args.recipients, domains=args.domains,
        timeout=args.timeout, depth=args.depth, messages_per_connection=args.per_connection,
        pipelining=not args.no_pipelining, use_bdat=args.bdat, tls=TLSPolicy(args.starttls), helo_name=args.helo,
        sender=args.sender, source_address=args.source, reply_timeout=args.reply_timeout, duration=args.duration,
        rate=args.rate, ramp=args.ramp, template=args.template,
        dkim=DkimOptions(args.dkim_key, args.dkim_domain, args.dkim_selector) if args.dkim_key else None,
        seed=args.seed, interval=args.interval,
    )


def run(args: argparse.Namespace) -> int:
    if args.schema:
        from fastmta.load.schema import SCHEMA

        print(json.dumps(SCHEMA, indent=2))
        return 0
    if args.target is None and not args.sink:
        print("fastmta load: give a target HOST:PORT or --sink", file=sys.stderr)
        return 2
    try:
        _spec(args, "localhost", 25).check()
        if args.workers > args.connections:
            raise ValueError(f"--workers {args.workers} needs at least as many --connections")
    except ValueError as exc:
        print(f"fastmta load: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        from fastmta.load.plot import plot_available

        problem = plot_available()
        if problem:
            print(f"fastmta load: --plot: {problem}", file=sys.stderr)
            return 2
    show = not args.quiet and not args.json and sys.stderr.isatty()

    def go(host: str, port: int) -> LoadResult:
        spec = _spec(args, host, port)
        progress = _progress_line if show else None
        if args.workers > 1:
            return run_load_processes(spec, args.workers, progress)
        return _run_loop(run_load(spec, progress))

    if args.sink:
        with embedded_sink() as (host, port):
            result = go(host, port)
    else:
        host, port = args.target
        result = go(host, port)
    if show:
        sys.stderr.write("\n")
    if args.plot:
        from fastmta.load.plot import plot

        plot(result, args.plot)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, sort_keys=True))
    else:
        print(_summary(result))
        if args.plot:
            print(f"plot                {args.plot}")
    return 0 if result.complete else 1


def _run_loop(coro: Any) -> LoadResult:
    import uvloop

    result: LoadResult = uvloop.run(coro)
    return result


__all__ = ["PERCENTILES", "add_arguments", "run"]
