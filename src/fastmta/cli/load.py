"""Load-test an SMTP server with generated messages.

Closed loop: --connections C connections, each reusing its connection and
pipelining (one round trip per message), until --messages N have been sent or
--timeout seconds have passed. Prints a progress line while running and a
summary at the end (--json: one JSON object, see `LoadResult`).

Examples:
  fastmta load 127.0.0.1:2525 --messages 20000 --connections 10 --size 2048
  fastmta load --sink --messages 20000          # against a fresh local `fastmta sink`
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Coroutine
from typing import Any

from fastmta.cli.sinkproc import embedded_sink
from fastmta.loadgen import LoadResult, LoadSpec, run_load
from fastmta.protocol import TLSPolicy


def parse_hostport(value: str, default_port: int = 25) -> tuple[str, int]:
    """'host:port', '[v6]:port', 'host' -> (host, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":")
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    if not host:
        raise argparse.ArgumentTypeError(f"missing host in {value!r}")
    if port and not port.isdigit():
        raise argparse.ArgumentTypeError(f"bad port in {value!r}")
    return host, int(port) if port else default_port


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", type=parse_hostport, help="server as HOST:PORT (port defaults to 25)")
    p.add_argument("--sink", action="store_true", help="start a local `fastmta sink` on 127.0.0.1 and load it")
    p.add_argument("--messages", "-m", type=int, default=10_000, help="messages to send (default 10000)")
    p.add_argument("--connections", "-c", type=_positive, default=10, help="concurrent connections (default 10)")
    p.add_argument("--size", "-s", type=int, default=2048, help="message size in bytes (default 2048)")
    p.add_argument("--recipients", "-r", type=_positive, default=1, help="recipients per message (default 1)")
    p.add_argument("--domains", "-d", type=_positive, default=1, help="spread recipients over N domains (default 1)")
    p.add_argument("--depth", type=_positive, default=2, help="transactions in flight per connection (default 2)")
    p.add_argument("--per-connection", type=int, default=0, metavar="N",
                   help="open a new connection after N messages (default 0: reuse without limit)")
    p.add_argument("--no-pipelining", action="store_true", help="lock-step even when the server offers PIPELINING")
    p.add_argument("--bdat", action="store_true", help="use BDAT (CHUNKING) when offered instead of DATA")
    p.add_argument("--starttls", choices=[t.value for t in TLSPolicy], default="never",
                   help="STARTTLS policy (default never; the server certificate is not verified in load tests)")
    p.add_argument("--source", metavar="ADDR", help="bind connections to this local address")
    p.add_argument("--helo", default="load.fastmta.test", help="EHLO name (default load.fastmta.test)")
    p.add_argument("--from", dest="sender", default="load@fastmta.test", help="envelope sender")
    p.add_argument("--timeout", type=float, default=300.0, help="stop after this many seconds (default 300)")
    p.add_argument("--reply-timeout", type=float, default=30.0, help="seconds to wait for each reply (default 30)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line")


def _progress_line(r: LoadResult) -> None:
    sys.stderr.write(
        f"\r{r.messages_attempted}/{r.messages_requested} sent  {r.messages_per_s:,.0f} msg/s  "
        f"accepted {r.messages_accepted}  failed {r.messages_failed}  conn errors {r.connect_failures}   "
    )
    sys.stderr.flush()


def _summary(r: LoadResult) -> str:
    lines = [
        f"target              {r.target}",
        f"messages            {r.messages_accepted} accepted / {r.messages_attempted} sent / {r.messages_requested} requested",
        f"recipients          {r.recipients_accepted} accepted, {r.recipients_refused} refused",
        f"elapsed             {r.elapsed_s:.2f} s",
        f"throughput          {r.messages_per_s:,.0f} messages/s",
        f"client CPU          {r.cpu_us_per_message:.1f} us/message ({r.cpu_s:.2f} s)",
        f"connections         {r.connections_opened} opened, {r.connect_failures} failed",
        "replies             " + (", ".join(f"{k}: {v}" for k, v in sorted(r.replies.items())) or "none"),
    ]
    for reason, count in sorted(r.errors.items(), key=lambda kv: -kv[1]):
        lines.append(f"error               {count} x {reason}")
    if r.timed_out:
        lines.append("TIMED OUT           the run hit --timeout before all messages were sent")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.target is None and not args.sink:
        print("fastmta load: give a target HOST:PORT or --sink", file=sys.stderr)
        return 2

    def go(host: str, port: int) -> LoadResult:
        spec = LoadSpec(
            host=host, port=port, messages=args.messages, connections=args.connections, size=args.size,
            recipients=args.recipients, domains=args.domains, timeout=args.timeout, depth=args.depth,
            messages_per_connection=args.per_connection, pipelining=not args.no_pipelining, use_bdat=args.bdat,
            tls=TLSPolicy(args.starttls), helo_name=args.helo, sender=args.sender, source_address=args.source,
            reply_timeout=args.reply_timeout,
        )
        show = not args.quiet and not args.json and sys.stderr.isatty()
        return _run_loop(run_load(spec, _progress_line if show else None))

    if args.sink:
        with embedded_sink() as (host, port):
            result = go(host, port)
    else:
        host, port = args.target
        result = go(host, port)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, sort_keys=True))
    else:
        if not args.quiet and sys.stderr.isatty():
            sys.stderr.write("\n")
        print(_summary(result))
    return 0 if result.complete else 1


def _run_loop(coro: Coroutine[Any, Any, LoadResult]) -> LoadResult:
    import uvloop

    return uvloop.run(coro)
