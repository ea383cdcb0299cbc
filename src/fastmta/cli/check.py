"""Check a campaign job, a pickup file or a message before it is sent.

PATH is a campaign job (*.toml), a pickup file (*.eml with X-Sender and
X-Receiver), any other RFC 5322 message (the envelope sender is --from, else
its Return-Path or From), or a directory (every *.toml and *.eml in it).
A campaign is judged by its first rendered message, with the configuration's
[return_path] and [unsubscribe] applied and signed as `fastmta send` would.

Checks:
  content   headers (RFC 5322 form, one From/Date/Message-ID, lookalike
            display names), text/plain beside HTML, HTML parse errors and
            unclosed tags (html5lib), links to numeric IPs or URL shorteners,
            link text showing another domain, image-only mail, size (Gmail
            clips over 102 KB), unsubscribe link and one-click headers
  DNS       SPF for each egress IP (--ip, else [[sources]] address), DKIM
            keys published and matching the private keys, DMARC record and
            alignment with From, PTR of each egress IP (forward-confirmed),
            STARTTLS at the first MX of the top recipient domains; all lookups
            through the configuration's [dns] nameservers
  spam      SpamAssassin's score and rule hits (local tests only), when
            installed; otherwise the report says it was skipped
Then the bulk-sender rules of Gmail, Yahoo and Microsoft, pass or fail.

Exit status: 0 clean, 1 warnings only, 2 errors (or bad usage).

Examples:
  fastmta check spool/welcome.toml --config fastmta.toml
  fastmta check newsletter.eml --from bounces@news.example.com --ip 192.0.2.10
  fastmta check spool/ --config fastmta.toml --no-network-smtp --json
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fastmta.check import CheckOptions, Report, Severity, check_path
from fastmta.cli import UsageError
from fastmta.cli.terminal import plain, safe_text
from fastmta.delivery.config import Config, load_config
from fastmta.errors import ConfigError

_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "dim", Severity.OK: "green"}
_STATUS_STYLE = {"pass": "green", "fail": "bold red", "warn": "yellow", "unknown": "dim"}


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="campaign job (*.toml), pickup file or message (*.eml), or a directory of them")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="the configuration `send`/`serve` use: [dns] nameservers, [[sources]], [[dkim]], "
                   "[return_path], [unsubscribe], [smtp]")
    p.add_argument("--from", dest="sender", metavar="ADDRESS",
                   help="envelope sender of a message without X-Sender (default: its Return-Path, else From)")
    p.add_argument("--ip", action="append", type=_ip, default=[], metavar="IP",
                   help="an egress IP to check SPF and PTR for (repeatable; default: [[sources]] address)")
    p.add_argument("--top-domains", type=int, default=3, metavar="N",
                   help="probe the first MX of the N recipient domains with most recipients (default 3)")
    p.add_argument("--smtp-port", type=_port, default=25, metavar="PORT",
                   help="port of the STARTTLS probe (default 25)")
    p.add_argument("--smtp-timeout", type=_positive, default=10.0, metavar="SECONDS",
                   help="timeout of each step of the STARTTLS probe (default 10)")
    p.add_argument("--no-network-smtp", action="store_true", help="no SMTP connections (no STARTTLS probe)")
    p.add_argument("--no-dns", action="store_true", help="content checks only: no DNS lookups, no SMTP")
    p.add_argument("--no-spamassassin", action="store_true", help="do not run SpamAssassin even when installed")
    p.add_argument("--json", action="store_true", help="one JSON document on standard output instead of tables")


def _inputs(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                            and p.suffix.lower() in (".toml", ".eml"))
            if not inside:
                raise UsageError(f"{path}: no *.toml or *.eml file in it")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{path}: no such file or directory")
    return found


def _show(console: Console, report: Report) -> None:
    console.print(plain(f"{report.source} ({report.kind})", "bold"))
    for key, value in report.facts.items():
        console.print(plain(f"  {key}: {value}"))
    table = Table(show_lines=False, expand=False)
    for column in ("severity", "check", "finding", "where"):
        table.add_column(column, overflow="fold")
    for f in report.findings:
        table.add_row(plain(f.severity.value, _STYLE[f.severity]), plain(f.check), plain(f.finding), plain(f.where))
    console.print(table)
    bulk = Table(title="bulk-sender rules (Gmail, Yahoo, Microsoft)", expand=False)
    for column in ("requirement", "status", "who"):
        bulk.add_column(column, overflow="fold")
    for row in report.bulk_summary():
        bulk.add_row(plain(row["what"]), plain(row["status"], _STATUS_STYLE[row["status"]]), plain(row["who"]))
    console.print(bulk)
    verdict = {0: "clean", 1: "warnings only", 2: "errors"}[report.exit_code]
    console.print(plain(f"{len(report.errors)} error(s), {len(report.warnings)} warning(s): {verdict}",
                        _STYLE[Severity.ERROR] if report.errors else ""))
    console.print()


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config) if args.config is not None else Config()
    except ConfigError as exc:
        raise UsageError(f"configuration error: {exc}") from None
    if args.top_domains < 0:
        raise UsageError("--top-domains must be 0 or more")
    options = CheckOptions(
        ips=tuple(args.ip),
        sender=args.sender,
        dns=not args.no_dns,
        smtp_probe=not args.no_network_smtp and args.top_domains > 0,
        smtp_port=args.smtp_port,
        smtp_timeout=args.smtp_timeout,
        top_domains=args.top_domains,
        spamassassin=not args.no_spamassassin,
    )
    reports = [check_path(path, config, options) for path in _inputs(args.paths)]
    code = max(r.exit_code for r in reports)
    if args.json:
        # ensure_ascii: every control character of the input comes out escaped.
        doc = {"exit_code": code, "reports": [r.to_dict() for r in reports]}
        sys.stdout.write(json.dumps(doc, ensure_ascii=True, indent=2) + "\n")
        return code
    console = Console(highlight=False)
    for report in reports:
        _show(console, report)
    if len(reports) > 1:
        console.print(safe_text(f"{len(reports)} inputs: exit {code}"))
    return code
