"""The ``fastmta`` command: one sub-module per sub-command.

Each sub-module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Imports flow one way: nothing in fastmta imports the CLI.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence


class UsageError(Exception):
    """A usage or configuration error: reported on stderr as one line, exit status 2.

    Raised by a sub-command wherever it finds the error (deep inside a run,
    too), so that every such error ends the same way, as ``--help`` says.
    """


# name -> (module, one-line help). Modules are imported lazily so that
# `fastmta sink` does not pay for loading the engine, and vice versa.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fastmta.cli.demo", "deliver the bundled example campaign to a built-in local sink"),
    "send": ("fastmta.cli.send", "deliver a spool directory (pickup files, campaign jobs)"),
    "serve": ("fastmta.cli.serve", "run as an MTA service: SMTP/HTTP injection, pickup, queue control, metrics"),
    "sink": ("fastmta.cli.sink", "run a fast discarding SMTP server with fault injection"),
    "load": ("fastmta.cli.load", "load-test an SMTP server with generated messages"),
    "suppress": ("fastmta.cli.suppress", "manage the suppression list (add, remove, list, import, export)"),
    "queue": ("fastmta.cli.queue", "look into the queue of a running `fastmta serve` and act on it (suspend, retry, bounce...)"),
    "classify": ("fastmta.cli.classify", "classify SMTP replies or bounce messages as the engine would (JSON lines)"),
    "check": ("fastmta.cli.check", "lint a campaign, pickup file or message: content, SPF/DKIM/DMARC, PTR, TLS, SpamAssassin"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The full parser for *selected* (only that sub-command's module is imported)."""
    parser = argparse.ArgumentParser(prog="fastmta", description="fastmta: high-throughput email delivery")
    from fastmta import __version__

    parser.add_argument("--version", action="version", version=f"fastmta {__version__}")
    parser.add_argument(
        "--umask", type=_octal, default=0o077, metavar="OCTAL",
        help="file mode mask for everything fastmta creates: queue, journal, bodies, accounting, "
        "captures, summaries (default 077: files 0600, directories 0700, as Postfix keeps its queue; "
        "027 lets a group read them)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != selected:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def parse_hostport(value: str, default_port: int = 25) -> tuple[str, int]:
    """'host:port', '[v6]:port', 'host' -> (host, port) of a server to connect to: an argparse type of
    several commands (a port of 1-65535; "host:" with no port is refused, not taken for 25)."""
    colon = False
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise argparse.ArgumentTypeError(f"bad port in {value!r} ([v6]:port)")
        colon, port = rest.startswith(":"), rest[1:]
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
        colon = True
    else:
        host, port = value, ""
    if not host:
        raise argparse.ArgumentTypeError(f"missing host in {value!r}")
    if colon and not port:
        raise argparse.ArgumentTypeError(f"missing port after ':' in {value!r}")
    if port and (not port.isdigit() or not 1 <= int(port) <= 65535):
        raise argparse.ArgumentTypeError(f"bad port in {value!r} (1-65535)")
    return host, int(port) if port else default_port


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d`` or plain seconds, above 0 and under ten years: an argparse type."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    number, unit = (t[:-1], units[t[-1]]) if t[-1:] in units else (t, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 2h, 1d)") from None
    if not 0 < seconds < 10 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (above 0, under ten years)")
    return seconds


def _octal(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mask: {text!r} (e.g. 077)") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"mask out of range: {text!r}")
    return value


def _raise_open_file_limit() -> None:
    """Soft limit on open files up to the hard limit, as servers do at start.

    Each SMTP connection is a file descriptor: with the common soft limit of
    1,024, a sink holding 1,500 connections (or an engine with wide pools)
    would refuse well-behaved clients for want of descriptors.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # some containers refuse; keep the soft limit


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if a in COMMANDS), None)  # not an option value such as --umask 027
    if selected == "send":
        import signal

        # Until its loop handles them, SIGTERM stops `send`'s start-up (imports, opening the queue)
        # as Ctrl-C does: with a message and exit status 1, not a silent death by the signal.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        parser = build_parser(selected if selected in COMMANDS else None)
    except KeyboardInterrupt:
        print(f"fastmta {selected or ''}: interrupted while starting: nothing was done", file=sys.stderr)
        return 1 if selected == "send" else 130
    args = parser.parse_args(argv)  # argparse itself exits 2 on a bad option
    from fastmta.cli.terminal import install_safe_logging, safe_text

    install_safe_logging()
    _raise_open_file_limit()
    # Queued mail is nobody else's to read: under a default umask of 022 the
    # queue, bodies and accounting would be world-readable.
    os.umask(args.umask)
    try:
        code: int = args._run(args)
    except UsageError as exc:
        print(f"fastmta {args.command}: {safe_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a command's own handling had not begun (or let it through): no traceback
        print(f"fastmta {args.command}: interrupted", file=sys.stderr)
        return 1 if args.command == "send" else 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
