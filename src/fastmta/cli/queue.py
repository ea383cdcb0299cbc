"""Look into the queue of a running `fastmta serve` and act on it (its admin API).

  fastmta queue shape                        unfinished recipients per site by age (minutes), as qshape
  fastmta queue summary                      per source and site: ready, scheduled, in flight, connections,
                                             window/rate, why it waits, age of the oldest
  fastmta queue show ID                      one message: each recipient's state, attempts, last reply
  fastmta queue suspend TARGET [--for 2h] [--reason R]
                                             stop delivering TARGET (mail stays queued), until
                                             resumed or for a time
  fastmta queue resume TARGET                deliver TARGET again
  fastmta queue retry TARGET                 try TARGET's deferred recipients now
  fastmta queue bounce TARGET [--reason R]   give up on TARGET: its queued recipients end bounced
  fastmta queue delete TARGET                drop TARGET from the queue without a bounce
  fastmta queue why ADDRESS_OR_ID            why a recipient or message is (not) moving
  fastmta queue override campaign:ID         resume a campaign the reputation guard paused (bounce or
                                             complaint rate over [guard] limits) and let it finish

TARGET is site:NAME, domain:NAME, campaign:ID, a message id, or a bare word.

Examples:

  fastmta queue summary
  fastmta queue show 01J9Z6Q4W8M3K7T2
  fastmta queue suspend domain:example.com
  fastmta queue bounce campaign:welcome-2026-11 --reason "sent by mistake"
  fastmta queue why someone@example.com
  fastmta queue --json summary | jq '.queues[] | select(.ready > 0)'
  fastmta queue --url http://127.0.0.1:8026 --token "$TOKEN" summary

By default it talks to the service's unix socket (--socket, else
$FASTMTA_ADMIN_SOCKET, else /var/lib/fastmta/admin.sock; run it as the user
the service runs as: the socket is 0600); with --url, to the admin TCP port
with an admin token (--token or $FASTMTA_ADMIN_TOKEN).

Exit status: 0 done; 1 the server refused (an unknown id, a bad target, a
wrong token); 2 usage error or no connection to the service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
from rich.console import Console
from rich.table import Table

from fastmta.cli import UsageError, parse_duration
from fastmta.cli.terminal import plain, safe_text
from fastmta.serve.admin import DEFAULT_ADMIN_SOCKET

#: (sub-command, help, its argument's name and help, or None)
_SUBCOMMANDS: tuple[tuple[str, str, tuple[str, str] | None], ...] = (
    ("summary", "the queue per source and site", None),
    ("shape", "unfinished recipients per site by age, as Postfix's qshape", None),
    ("show", "one message and each recipient's state", ("id", "a message id")),
    ("suspend", "stop delivering a target (mail stays queued)", ("target", "site:NAME, domain:NAME, campaign:ID or an id")),
    ("resume", "deliver a suspended target again", ("target", "site:NAME, domain:NAME, campaign:ID or an id")),
    ("retry", "try a target's deferred recipients now", ("target", "site:NAME, domain:NAME, campaign:ID or an id")),
    ("bounce", "bounce a target's recipients", ("target", "site:NAME, domain:NAME, campaign:ID or an id")),
    ("delete", "drop a target from the queue without a bounce", ("target", "site:NAME, domain:NAME, campaign:ID or an id")),
    ("why", "why a recipient or message is (not) moving", ("target", "a recipient address or a message id")),
    ("override", "resume a campaign the reputation guard paused and let it finish", ("target", "campaign:ID")),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    # The connection options work before or after the sub-command
    # ("fastmta queue --json summary" and "fastmta queue summary --json"):
    # on the sub-parsers they default to SUPPRESS so they do not reset the
    # value given before the sub-command.
    _connection_options(p, suppress=False)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text, argument in _SUBCOMMANDS:
        s = sub.add_parser(name, help=help_text, description=help_text)
        if argument is not None:
            s.add_argument(argument[0], help=argument[1])
        if name == "bounce":
            s.add_argument("--reason", help="why (in the bounce reply and the accounting record)")
        if name == "suspend":
            s.add_argument("--for", dest="duration", type=parse_duration, metavar="DURATION",
                           help="end the suspension by itself after this long: 90s, 30m, 2h, 1d (default: "
                                "until resumed)")
            s.add_argument("--reason", help="why (kept with the suspension, shown by summary)")
        _connection_options(s, suppress=True)


def _connection_options(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    def d(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--socket", default=d(None), metavar="PATH",
                   help=f"the admin socket (default $FASTMTA_ADMIN_SOCKET, else {DEFAULT_ADMIN_SOCKET})")
    p.add_argument("--url", default=d(None), metavar="URL",
                   help="the admin TCP port instead, e.g. http://127.0.0.1:8026 (needs an admin token)")
    p.add_argument("--token", default=d(None), help="admin token for --url (default $FASTMTA_ADMIN_TOKEN)")
    p.add_argument("--json", action="store_true", default=d(False), help="print the server's JSON answer as it is")
    p.add_argument("--timeout", type=float, default=d(30.0), metavar="SECONDS",
                   help="give up on a server that does not answer (default 30)")


def run(args: argparse.Namespace) -> int:
    method, path, body = _request(args)
    status, data = asyncio.run(_call(args, method, path, body))
    if status >= 400:
        message = data.get("error") if isinstance(data, dict) else None
        print(f"fastmta queue {args.action}: {safe_text(message or f'HTTP {status}')}", file=sys.stderr)
        if status == 401:
            print("fastmta queue: pass an admin token (--token or $FASTMTA_ADMIN_TOKEN)", file=sys.stderr)
        return 1
    if args.json:
        # ensure_ascii: every control character arrives as a \\u escape, never raw.
        print(json.dumps(data, indent=2, sort_keys=False))
        return 0
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console.width = 200  # piped or captured: whole cells rather than rich's 80-column ellipses
    if args.action == "summary":
        _print_summary(console, data.get("queues", []) if isinstance(data, dict) else [])
    elif args.action == "shape":
        _print_shape(console, data.get("queues", []) if isinstance(data, dict) else [])
    else:
        _print_value(console, data)
    return 0


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    action = args.action
    if action in ("summary", "shape"):
        return "GET", "/v1/queue/summary", None
    if action == "show":
        return "GET", f"/v1/queue/messages/{quote(args.id, safe='')}", None
    if action == "why":
        return "GET", f"/v1/queue/why?target={quote(args.target, safe='')}", None
    body: dict[str, Any] = {"target": args.target}
    if action in ("bounce", "suspend") and args.reason:
        body["reason"] = args.reason
    if action == "suspend" and args.duration is not None:
        body["duration"] = args.duration
    return "POST", f"/v1/queue/{action}", body


async def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
    headers = {"Accept": "application/json"}
    connector: aiohttp.BaseConnector
    if args.url:
        if args.socket:
            raise UsageError("give --socket or --url, not both")
        base = args.url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise UsageError(f"--url must start with http:// or https://: {safe_text(args.url)}")
        where = base
        connector = aiohttp.TCPConnector()
        token = args.token or os.environ.get("FASTMTA_ADMIN_TOKEN")
        if token:
            headers["Authorization"] = f"Bearer {token}"
    else:
        socket = args.socket or os.environ.get("FASTMTA_ADMIN_SOCKET") or DEFAULT_ADMIN_SOCKET
        where = f"the admin socket {socket}"
        base = "http://localhost"  # the host part is not used on a unix socket
        connector = aiohttp.UnixConnector(path=socket)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, \
                session.request(method, base + path, json=body, headers=headers) as response:
            raw = await response.read()
            status = response.status
    except aiohttp.ClientConnectorError as exc:
        why = exc.os_error.strerror or str(exc.os_error)
        hint = " (is `fastmta serve` running? see --socket/--url)"
        if isinstance(exc.os_error, PermissionError):
            hint = " (run as the user `fastmta serve` runs as: the socket is 0600)"
        raise UsageError(f"cannot connect to {safe_text(where)}: {safe_text(why)}{hint}") from None
    except TimeoutError:
        raise UsageError(f"no answer from {safe_text(where)} within {args.timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise UsageError(f"talking to {safe_text(where)}: {safe_text(exc)}") from None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"error": f"HTTP {status}, not JSON: {raw[:200].decode('utf-8', 'replace')}"}


# ------------------------------------------------------------------ tables

def _throttle(row: dict[str, Any]) -> dict[str, Any]:
    # engine.control nests the throttle's state; engine.queue_stats() (no control) has it flat.
    t = row.get("throttle")
    return t if isinstance(t, dict) else row


def _place(row: dict[str, Any]) -> str | None:
    kind, site, domain = row.get("kind"), row.get("site"), row.get("domain")
    if kind == "total":
        return "total"
    if kind == "routing":
        return f"{domain} (DNS)"
    return site if site is not None else (f"domain {domain}" if domain is not None else None)


def _window_rate(row: dict[str, Any]) -> str | None:
    t = _throttle(row)
    if "window" not in t and "rate" not in t:
        return None
    return f"{_cell(t.get('window'))}/{_cell(t.get('rate'))}"


def _why_waiting(row: dict[str, Any]) -> str | None:
    """What holds the row's mail back, in a few words (``fastmta queue why`` says it per recipient)."""
    if row.get("kind") == "total":
        return f"{row.get('unfinished', '?')} unfinished" if "unfinished" in row else None
    t = _throttle(row)
    parts = []
    if row.get("suspended_by"):
        parts.append("suspended: " + ", ".join(str(k) for k in row["suspended_by"]))
    if t.get("suspended_for"):
        last = t.get("last_throttle")
        reason = last.get("reason") if isinstance(last, dict) else None
        parts.append(f"site paused {_age(t['suspended_for'])}" + (f" ({reason})" if reason else ""))
    if t.get("hosts_down") or t.get("reconnect_in"):
        parts.append(f"connections refused, retry in {_age(t.get('reconnect_in') or 0)}")
    if row.get("sender_held"):
        parts.append(f"{row['sender_held']} held for the sender's domain")
    if row.get("routing"):
        parts.append("waiting for DNS")
    top = row.get("top_reply")
    if isinstance(top, dict) and row.get("kind") != "total":
        parts.append(f"last reply: {top.get('reply')} ({top.get('recipients')})")
    return "; ".join(parts)


#: Summary columns: header, right-aligned, how to get the cell (None: not in this answer).
_SUMMARY_COLUMNS: tuple[tuple[str, bool, Callable[[dict[str, Any]], Any]], ...] = (
    ("source", False, lambda r: r.get("source")),
    ("site", False, _place),
    ("ready", True, lambda r: r.get("ready")),
    ("scheduled", True, lambda r: r.get("scheduled")),
    ("in flight", True, lambda r: r.get("in_flight")),
    ("held", True, lambda r: r.get("held")),
    ("conns", True, lambda r: r.get("connections")),
    ("window/rate", False, _window_rate),
    ("why", False, _why_waiting),
    ("oldest", True, lambda r: _age(r["oldest_age"]) if r.get("oldest_age") is not None else None),
)


_SHAPE_HEADERS = ("5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+")  # minutes, as qshape


def _print_shape(console: Console, rows: list[Any]) -> None:
    """qshape's table: a row per site (or domain) and the total, T then the recipients by age in minutes."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("")
    for header in ("T", *_SHAPE_HEADERS):
        table.add_column(header, justify="right")
    for row in rows:
        ages = row.get("ages") if isinstance(row, dict) else None
        if not isinstance(ages, list) or (not sum(ages) and row.get("kind") != "total"):
            continue
        name = "TOTAL" if row.get("kind") == "total" else row.get("site") or row.get("domain") or "(routing)"
        if row.get("kind") == "site" and row.get("source") not in (None, "default", "*"):
            name = f"{name} ({row['source']})"
        table.add_row(plain(name), *(plain(str(n)) for n in (sum(ages), *ages)),
                      style="bold" if row.get("kind") == "total" else None)
    console.print(table)


def _print_summary(console: Console, rows: list[Any]) -> None:
    rows = [r for r in rows if isinstance(r, dict)]
    if all(r.get("kind") == "total" for r in rows):  # no site has a queue or work: only the (empty) total
        console.print("the queue is empty")
        return
    present = [c for c in _SUMMARY_COLUMNS if any(c[2](r) not in (None, "") for r in rows)]
    table = Table(box=None, pad_edge=False, header_style="bold")
    for header, right, _ in present:
        table.add_column(header, justify="right" if right else "left")
    for row in rows:
        table.add_row(*(plain(_cell(get(row))) for _, _, get in present),
                      style="bold" if row.get("kind") == "total" else None)
    console.print(table)
    for total in (r for r in rows if r.get("kind") == "total"):
        for rule in total.get("suspensions") or []:
            if isinstance(rule, dict) and "rule" in rule:
                text = f"{rule['rule']} since {_scalar('since_at', rule.get('since'))}, holding {_cell(rule.get('held'))}"
                if rule.get("until") is not None:
                    text += f", until {_scalar('since_at', rule['until'])}"
                if rule.get("reason"):
                    text += f": {rule['reason']}"
            else:
                text = json.dumps(rule)
            console.print(plain(f"suspended: {text}"))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _age(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return _cell(seconds)
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _print_value(console: Console, data: Any, indent: str = "") -> None:
    """Any JSON answer, readably: ``key: value`` lines, lists of objects as tables or blocks."""
    if isinstance(data, dict):
        for key, value in data.items():
            _print_item(console, key, value, indent)
    elif _is_rows(data):
        _print_rows(console, data, indent)
    else:
        console.print(plain(f"{indent}{_cell(data)}"))


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _print_item(console: Console, key: str, value: Any, indent: str) -> None:
    if _is_rows(value):
        console.print(plain(f"{indent}{key}:"))
        _print_rows(console, value, indent + "  ")
    elif isinstance(value, dict) and value:
        console.print(plain(f"{indent}{key}:"))
        _print_value(console, value, indent + "  ")
    elif isinstance(value, list):
        console.print(plain(f"{indent}{key}: {', '.join(_cell(v) for v in value) or '-'}"))
    else:
        console.print(plain(f"{indent}{key}: {_scalar(key, value)}"))


#: Wider than this, rows are shown one block each (a recipient's full record does not fit a line).
_TABLE_COLUMNS = 6
#: A block starts with what names the row, then what explains it.
_FIRST = ("recipient", "address", "email", "id", "site", "reason", "status", "state")


def _print_rows(console: Console, rows: list[dict[str, Any]], indent: str) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    if len(columns) <= _TABLE_COLUMNS and not any(isinstance(v, (dict, list)) for r in rows for v in r.values()):
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in columns:
            table.add_column(plain(column))
        for row in rows:
            table.add_row(*(plain(_scalar(c, row.get(c))) for c in columns))
        console.print(table)
        return
    for row in rows:
        # Empty values left out: a block shows what is known about the row.
        items = [(k, v) for k, v in row.items() if v not in (None, "", [], {})] or [("-", None)]
        items.sort(key=lambda kv: _FIRST.index(kv[0]) if kv[0] in _FIRST else len(_FIRST))
        (key, value), rest = items[0], items[1:]
        console.print(plain(f"{indent}- {key}: {_scalar(key, value)}"))
        for key, value in rest:
            _print_item(console, key, value, indent + "  ")


def _scalar(key: str, value: Any) -> str:
    # Wall-clock times (queued_at, next_attempt, time) read better as dates.
    if isinstance(value, float) and value > 1e9 and (key == "time" or key.endswith(("_at", "attempt"))):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key.endswith("age"):
        return _age(value)
    return _cell(value)
