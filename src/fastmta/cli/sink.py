"""Run a fast SMTP server that accepts mail and discards (or captures) it.

For benchmarks, for testing senders, and for rehearsing what real providers
do to them: faults per phase, tarpits, connection caps, rate limits,
greylisting, unknown users, and provider-like reply texts.

Prints "listening on ADDR:PORT" for every bound address (port 0 picks a free
port), then runs until SIGINT or SIGTERM; --stats-json is written on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import uvloop

from fastmta.sink import SinkServer
from fastmta.sink.config import (
    PHASES,
    FaultConfig,
    ListenerConfig,
    SinkConfig,
    parse_delay,
    parse_fault,
    parse_listen,
    parse_rate,
    parse_throttle,
)
from fastmta.sink.profiles import PROFILES
from fastmta.sink.stats import write_json_atomically

T = TypeVar("T")


def _arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Turn a parser's ValueError into argparse's own error message."""

    def wrapped(text: str) -> T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    wrapped.__name__ = parse.__name__.removeprefix("parse_")
    return wrapped


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad share {text!r}: a number between 0 and 1") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"share must be between 0 and 1, not {text}")
    return value


def _profile(name: str) -> str:
    if name.lower() not in PROFILES:
        raise argparse.ArgumentTypeError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}")
    return name.lower()


def _epilog() -> str:
    lines = ["profiles (--profile NAME, or per listener: --listen ADDR:PORT=NAME):"]
    lines += [f"  {p.name:<10} {p.description}" for p in PROFILES.values()]
    lines += [
        "",
        f"phases (for --fault and --delay): {', '.join(PHASES)}  (eod = end of data)",
        "",
        "examples:",
        "  fastmta sink --listen 127.0.0.1:2525",
        "  fastmta sink --listen 127.0.0.1:0=gmail --listen 127.0.0.2:0=yahoo --rate-limit 20/s",
        "  fastmta sink --fault rcpt:0.1:450 --fault eod:0.01:'554 5.7.1 spam' --delay connect:2",
        "  fastmta sink --profile appliance --unknown-recipient 'nobody*@*' --capture /tmp/mail",
        "  fastmta sink --profile gmail --site-rate-limit 500/s:50 --throttle-ip 127.0.0.2=10",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _epilog()
    g = parser.add_argument_group("listening")
    g.add_argument(
        "--listen",
        metavar="ADDR:PORT[=PROFILE]",
        action="append",
        type=_arg(parse_listen),
        help="address to listen on, repeatable; [::1]:PORT for IPv6; PORT 0 picks a free port; "
        "=PROFILE gives this listener its own profile (default: 127.0.0.1:0)",
    )
    g.add_argument(
        "--profile",
        type=_profile,
        default="default",
        help=f"reply texts of listeners without their own profile: {', '.join(PROFILES)} (default: default)",
    )
    g.add_argument("--hostname", help="host name in the greeting and EHLO reply (default: the profile's)")
    g.add_argument("--backlog", type=int, default=1024, metavar="N", help="listen backlog (default: 1024)")

    g = parser.add_argument_group("output")
    g.add_argument("--stats-json", type=Path, metavar="FILE", help="write counters as JSON here on exit")
    g.add_argument(
        "--capture",
        type=Path,
        metavar="DIR",
        help="write each accepted message to its own file in DIR, envelope first as "
        "X-Sender:/X-Receiver: headers (pickup format), instead of discarding it (files 0600)",
    )
    g.add_argument(
        "--capture-memory", type=int, default=256 * 1024 * 1024, metavar="BYTES",
        help="memory for messages still arriving, all connections together; past it a message is "
        "refused with 452 4.3.1 and retried by its client (default: 256 MiB)",
    )

    g = parser.add_argument_group("limits")
    g.add_argument(
        "--max-size", type=int, default=50 * 1024 * 1024, metavar="BYTES",
        help="largest message accepted, advertised with SIZE (default: 52428800)",
    )  # fmt: skip
    g.add_argument(
        "--max-recipients", type=int, default=1000, metavar="N",
        help="recipients per transaction; more get 452 4.5.3 (default: 1000)",
    )  # fmt: skip
    g.add_argument(
        "--max-line-length", type=int, default=2048, metavar="BYTES",
        help="longest command line with its CRLF, at least 512 (default: 2048)",
    )  # fmt: skip
    g.add_argument(
        "--max-data-line", type=int, default=0, metavar="BYTES",
        help="refuse messages (554 5.6.0) with a text line longer than this, CRLF included; "
        "1000 is RFC 5321's limit (default: 0, no check)",
    )  # fmt: skip
    g.add_argument(
        "--max-errors", type=int, default=20, metavar="N",
        help="protocol errors before 421 and disconnect (default: 20)",
    )  # fmt: skip
    g.add_argument(
        "--idle-timeout", type=float, default=300.0, metavar="SECONDS",
        help="close connections that complete no command and send content slower than "
             "--min-data-rate for this long (default: 300)",
    )  # fmt: skip
    g.add_argument(
        "--min-data-rate", type=float, default=256.0, metavar="BYTES_PER_S",
        help="message content slower than this over an idle period counts as idle (default: 256)",
    )  # fmt: skip

    g.add_argument(
        "--until-stdin-eof", action="store_true",
        help="also stop when standard input closes (for a parent process that runs the sink)",
    )  # fmt: skip

    g = parser.add_argument_group("TLS")
    g.add_argument("--no-starttls", action="store_true", help="do not offer STARTTLS")
    g.add_argument("--tls-cert", type=Path, metavar="PEM", help="certificate chain (default: self-signed, made at start)")
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    g.add_argument(
        "--tls-cert-out", type=Path, metavar="FILE",
        help="write the certificate in use here, so clients can trust exactly it",
    )  # fmt: skip

    g = parser.add_argument_group("fault injection")
    g.add_argument("--seed", type=int, metavar="N", help="seed every random choice, making runs reproducible")
    g.add_argument(
        "--fault",
        metavar="PHASE:PROB:CODE[ TEXT]",
        action="append",
        type=_arg(parse_fault),
        default=[],
        help="answer PHASE with CODE (and TEXT, else the profile's text for CODE) with probability PROB; "
        "repeatable; a 421 disconnects. e.g. rcpt:0.1:450, connect:0.05:421, eod:0.02:'554 5.7.1 spam'",
    )
    g.add_argument(
        "--delay",
        metavar="PHASE:SECONDS",
        action="append",
        type=_arg(parse_delay),
        default=[],
        help="tarpit: wait SECONDS before answering PHASE; repeatable. e.g. connect:2, rcpt:0.5",
    )
    g.add_argument(
        "--max-connections", type=int, default=0, metavar="N",
        help="concurrent connections per client IP; more get the profile's 421 (default: no cap)",
    )  # fmt: skip
    g.add_argument(
        "--rate-limit",
        type=_arg(parse_rate),
        metavar="N/s[:BURST]",
        help="messages per client IP (token bucket; N/s, N/m or N/h); beyond it MAIL gets the "
        "profile's rate-limit reply (gmail 421 4.7.28, yahoo 421 [TSS04], outlook 451 4.7.650)",
    )
    g.add_argument(
        "--site-rate-limit",
        type=_arg(parse_rate),
        metavar="N/s[:BURST]",
        help="messages of all clients together, per listener (each listener is one site; GCRA); beyond "
        "it MAIL gets the profile's rate-limit reply; counted as faults.site_rate_limit in --stats-json, "
        "with 'throttled' and 'throttled_per_1000_messages'",
    )
    g.add_argument(
        "--throttle-ip",
        type=_arg(parse_throttle),
        metavar="ADDR[/LEN][=SECONDS]",
        action="append",
        default=[],
        help="answer every MAIL from these clients with the profile's rate-limit reply (gmail 421 4.7.28), "
        "for SECONDS from each address's first MAIL (default: always); other clients pass; repeatable. "
        "e.g. 127.0.0.2, 10.0.0.0/24=30",
    )
    g.add_argument(
        "--greylist", action="store_true",
        help="first try of each sender/recipient/client-IP triple gets 450 4.7.1; retries pass",
    )  # fmt: skip
    g.add_argument(
        "--greylist-delay", type=float, default=0.0, metavar="SECONDS",
        help="with --greylist: retries earlier than this are refused again (default: 0)",
    )  # fmt: skip
    g.add_argument(
        "--unknown-recipient",
        metavar="PATTERN",
        action="append",
        default=[],
        help="recipients matching this glob (case-insensitive, e.g. 'bounce-*@*') get 550 5.1.1 "
        "at RCPT (the appliance profile: at end of data, for the whole message); repeatable",
    )
    g.add_argument(
        "--unknown-at", choices=["rcpt", "eod"],
        help="where --unknown-recipient addresses are refused, whatever the profile does",
    )  # fmt: skip
    g.add_argument(
        "--filtered-share", type=_share, default=0.0, metavar="SHARE",
        help="a filter that blames the mailbox: this share (0..1) of the recipients that exist gets the "
        "profile's unknown-user reply at end of data (the same addresses every time)",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace) -> SinkConfig:
    """The :class:`SinkConfig` the command line describes."""
    faults = FaultConfig(
        replies=tuple(args.fault),
        delays=tuple(args.delay),
        max_connections_per_ip=args.max_connections,
        rate_limit=args.rate_limit,
        site_rate_limit=args.site_rate_limit,
        throttle=tuple(args.throttle_ip),
        greylist=args.greylist or args.greylist_delay > 0,
        greylist_seconds=args.greylist_delay,
        unknown_recipients=tuple(args.unknown_recipient),
        unknown_at=args.unknown_at,
        filtered_share=args.filtered_share,
    )
    listens: list[ListenerConfig] = args.listen or [ListenerConfig()]
    listeners = tuple(
        ListenerConfig(
            host=lc.host,
            port=lc.port,
            # "=PROFILE" on the listener wins over --profile.
            profile=lc.profile if lc.profile != "default" else args.profile,
            hostname=args.hostname,
        )
        for lc in listens
    )
    return SinkConfig(
        listeners=listeners,
        faults=faults,
        max_message_size=args.max_size,
        max_recipients=args.max_recipients,
        max_line_length=args.max_line_length,
        max_data_line=args.max_data_line,
        max_errors=args.max_errors,
        idle_timeout=args.idle_timeout,
        min_data_rate=args.min_data_rate,
        capture_dir=args.capture,
        capture_memory=args.capture_memory,
        seed=args.seed,
        starttls=not args.no_starttls,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        backlog=args.backlog,
    )


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    config: SinkConfig, stats_json: Path | None = None, cert_out: Path | None = None, *, until_stdin_eof: bool = False
) -> int:
    """Run until SIGINT/SIGTERM (or, with *until_stdin_eof*, until stdin closes); write the stats; 0 on a clean exit."""
    server = SinkServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if until_stdin_eof:
        # The parent holds the other end of our stdin: when it exits, even by
        # SIGKILL, the pipe closes and we follow instead of lingering.
        fd = sys.stdin.fileno()

        def on_stdin() -> None:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                stop.set()

        loop.add_reader(fd, on_stdin)
    try:
        addresses = await server.start()
    except OSError as e:
        print(f"fastmta sink: cannot listen: {e}", file=sys.stderr)
        return 1
    try:
        if cert_out is not None and server.certificate_pem is not None:
            cert_out.write_bytes(server.certificate_pem)
        for host, port in addresses:
            print(f"listening on {_format_address(host, port)}")
        # A parent reading our stdout through a pipe must see the ports now.
        sys.stdout.flush()
        await stop.wait()
    finally:
        await server.close()
        if stats_json is not None:
            write_json_atomically(stats_json, server.stats_dict())
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"fastmta sink: {e}", file=sys.stderr)
        return 2
    # Fail now, not after hours of serving, if the stats cannot be written.
    for option, path in (("--stats-json", args.stats_json), ("--tls-cert-out", args.tls_cert_out)):
        if path is not None and not path.parent.is_dir():
            print(f"fastmta sink: {option} {path}: directory {path.parent} does not exist", file=sys.stderr)
            return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config, args.stats_json, args.tls_cert_out, until_stdin_eof=args.until_stdin_eof))
