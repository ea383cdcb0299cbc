"""Manage the suppression list: who is never mailed again, why, and since when.

  fastmta suppress add ADDRESS [--scope global|domain|list] [--value V] [--reason TEXT] [--expires DAYS]
  fastmta suppress remove ADDRESS [--scope S] [--value V]
  fastmta suppress list [ADDRESS] [--json]
  fastmta suppress import FILE.csv      (columns: address[,scope,value,reason,source,created,expires])
  fastmta suppress export [FILE.csv]    (stdout without FILE)

The list lives in an SQLite database (--db, default ./suppression.db, the name
fastmta serve gives it in its DATA_DIR, or $FASTMTA_SUPPRESSIONS): query it
with sqlite3 if you like. Only add and import create one (and say so):
list, export and remove of a database that does not exist are refused, as
a name mistyped would show an empty list, or add to a list nobody reads. Scopes: global
(every message to the address: hard bounces), domain (mail from one sender
domain: complaints), list (one list or campaign tag: unsubscribes).

With --config FILE (the service's configuration) the list is the service's
(DATA_DIR/suppression.db unless --db says otherwise); when its [cluster] has
``suppression = true``, the list is the cluster's, in Redis: a change goes
there at once (every node skips the address within a second), list and
export read it. With Redis unreachable a change waits in the database's
backlog (the node using that database sends it when Redis is back) and the
exit status is 1; list and export then show the database's copy.

Exit status: 0 done; 1 nothing matched (remove), some import rows were
rejected (reported with their line), or Redis did not take the change yet;
2 usage error.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

from fastmta.cli import UsageError
from fastmta.cli.terminal import safe_text
from fastmta.errors import ConfigError, InputError
from fastmta.feedback.suppression import Scope, SqliteSuppressionStore, Suppression
from fastmta.feedback.suppression_redis import RedisSuppressionStore
from fastmta.queue.records import split_address


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", type=Path,
                   help="the suppression database (default: the service's with --config, else ./suppression.db "
                        "or $FASTMTA_SUPPRESSIONS)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="the service's configuration: its list, the cluster's (Redis) with [cluster] suppression")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = sub.add_parser("add", help="suppress an address")
    a.add_argument("address")
    a.add_argument("--scope", choices=[s.value for s in Scope], default="global")
    a.add_argument("--value", default="", help="the sender domain (scope domain) or list tag (scope list)")
    a.add_argument("--reason", default="added by an operator")
    a.add_argument("--expires", type=_days, metavar="DAYS", help="lift it after DAYS, > 0 (default: never)")
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


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not days > 0 or days == float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 days (leave it out for never): {text!r}")
    return days


def run(args: argparse.Namespace) -> int:
    db, cluster = args.db, None
    if args.config is not None:
        from fastmta.serve.config import load_service_config

        try:
            config = load_service_config(args.config)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        db = db or Path(config.serve.data_dir) / "suppression.db"
        if config.engine.cluster.active and config.engine.cluster.suppression:
            cluster = config.engine.cluster
    db = db or Path(os.environ.get("FASTMTA_SUPPRESSIONS", "suppression.db"))
    if cluster is None and not db.exists():
        old = db.with_name("suppressions.db")
        if args.db is None and args.config is None and not os.environ.get("FASTMTA_SUPPRESSIONS") and old.exists():
            # the default name before 2026-12-07
            raise UsageError(f"{safe_text(old.absolute())} is there, under the old default name: rename it "
                             f"{db.name} (the name fastmta serve gives it), or name it with --db")
        if args.action not in ("add", "import"):
            raise UsageError(f"no suppression database at {safe_text(db.absolute())} (--db or --config names one)")
        print(f"fastmta suppress: a new suppression database at {safe_text(db.absolute())}", file=sys.stderr)
    try:
        store = SqliteSuppressionStore(db) if cluster is None else RedisSuppressionStore(
            db, cluster.redis, prefix=cluster.prefix, timeout=max(cluster.timeout, 2.0), retry=cluster.retry)
    except (OSError, sqlite3.Error) as exc:
        raise UsageError(f"cannot open {db}: {exc}") from None
    try:
        if isinstance(store, RedisSuppressionStore):
            if args.action in ("list", "export", "remove") and not store.sync():  # a fresh copy of the hash
                print(f"fastmta suppress: Redis {safe_text(store.url)} unreachable: this is the copy in {db}",
                      file=sys.stderr)
            code = _act(store, args)
            if args.action in ("add", "remove", "import") and not store.push():
                print(f"fastmta suppress: Redis {safe_text(store.url)} unreachable: the change waits in {db}",
                      file=sys.stderr)
                return 1
            return code
        return _act(store, args)
    finally:
        store.close()


def _act(store: SqliteSuppressionStore, args: argparse.Namespace) -> int:
    if args.action == "add":
        address = args.address.strip()
        try:
            split_address(address, "address")
        except InputError as exc:
            raise UsageError(safe_text(exc.reason)) from None
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
                print("\t".join(safe_text(cell) for cell in s.as_row()))  # each cell escaped, the tabs kept
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
        if not sys.stdout.isatty():
            store.export_csv(sys.stdout)
            return 0
        shown = io.StringIO()  # on a terminal, what it would act on is shown escaped (a file gets it as stored)
        store.export_csv(shown)
        sys.stdout.write("".join(safe_text(line) + "\n" for line in shown.getvalue().splitlines()))
        return 0
    with open(args.file, "w", newline="", encoding="utf-8") as f:
        n = store.export_csv(f)
    print(f"exported {n}", file=sys.stderr)
    return 0
