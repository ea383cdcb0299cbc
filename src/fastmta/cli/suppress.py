"""Manage the suppression list: who is never mailed again, why, and since when.

  fastmta suppress add ADDRESS [--scope global|domain|list] [--value V] [--reason TEXT] [--expires DAYS]
  fastmta suppress remove ADDRESS [--scope S] [--value V]
  fastmta suppress list [ADDRESS] [--json]
  fastmta suppress import FILE.csv      (columns: address[,scope,value,reason,source,created,expires])
  fastmta suppress export [FILE.csv]    (stdout without FILE)

The list lives in an SQLite database (--db, default ./suppressions.db, or
$FASTMTA_SUPPRESSIONS): query it with sqlite3 if you like. Scopes: global
(every message to the address: hard bounces), domain (mail from one sender
domain: complaints), list (one list or campaign tag: unsubscribes).

Exit status: 0 done; 1 nothing matched (remove) or some import rows were
rejected (reported with their line); 2 usage error.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

from fastmta.cli import UsageError
from fastmta.cli.terminal import safe_text
from fastmta.feedback.suppression import Scope, SqliteSuppressionStore, Suppression


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", type=Path, default=Path(os.environ.get("FASTMTA_SUPPRESSIONS", "suppressions.db")),
                   help="the suppression database (default ./suppressions.db or $FASTMTA_SUPPRESSIONS)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = sub.add_parser("add", help="suppress an address")
    a.add_argument("address")
    a.add_argument("--scope", choices=[s.value for s in Scope], default="global")
    a.add_argument("--value", default="", help="the sender domain (scope domain) or list tag (scope list)")
    a.add_argument("--reason", default="added by an operator")
    a.add_argument("--expires", type=float, metavar="DAYS", help="lift it after DAYS (default: never)")
    r = sub.add_parser("remove", help="lift suppressions of an address")
    r.add_argument("address")
    r.add_argument("--scope", choices=[s.value for s in Scope])
    r.add_argument("--value")
    ls = sub.add_parser("list", help="show suppressions (of one address)")
    ls.add_argument("address", nargs="?")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    im = sub.add_parser("import", help="add every row of a CSV file")
    im.add_argument("file", type=Path)
    ex = sub.add_parser("export", help="write every suppression as CSV")
    ex.add_argument("file", type=Path, nargs="?")


def run(args: argparse.Namespace) -> int:
    try:
        store = SqliteSuppressionStore(args.db)
    except (OSError, sqlite3.Error) as exc:
        raise UsageError(f"cannot open {args.db}: {exc}") from None
    try:
        return _act(store, args)
    finally:
        store.close()


def _act(store: SqliteSuppressionStore, args: argparse.Namespace) -> int:
    if args.action == "add":
        address = args.address.strip()
        if "@" not in address or any(c in address for c in "\r\n\x00<> "):
            raise UsageError(f"not an address: {safe_text(address)}")
        scope = Scope(args.scope)
        if scope is not Scope.GLOBAL and not args.value:
            raise UsageError(f"--scope {scope.value} needs --value")
        now = time.time()
        expires = now + args.expires * 86400 if args.expires else None
        store.add(Suppression(address, scope, args.value if scope is not Scope.GLOBAL else "", args.reason,
                              "operator", now, expires))
        return 0
    if args.action == "remove":
        removed = store.remove(args.address, Scope(args.scope) if args.scope else None, args.value)
        print(f"removed {removed}")
        return 0 if removed else 1
    if args.action == "list":
        for s in store.entries(args.address):
            if args.json:
                print(json.dumps({"address": s.address, "scope": s.scope.value, "value": s.value,
                                  "reason": s.reason, "source": s.source, "created": s.created,
                                  "expires": s.expires}))
            else:
                print(safe_text("\t".join(s.as_row())))
        return 0
    if args.action == "import":
        try:
            with open(args.file, newline="", encoding="utf-8-sig") as f:
                added, errors = store.import_csv(csv.DictReader(f))
        except OSError as exc:
            raise UsageError(f"{args.file}: {exc.strerror or exc}") from None
        for e in errors:
            print(f"fastmta suppress import: {safe_text(args.file)}: {safe_text(e)}", file=sys.stderr)
        print(f"imported {added}")
        return 1 if errors else 0
    # export
    if args.file is None:
        store.export_csv(sys.stdout)
        return 0
    with open(args.file, "w", newline="", encoding="utf-8") as f:
        n = store.export_csv(f)
    print(f"exported {n}", file=sys.stderr)
    return 0
