"""The suppression store (SQLite), its policies, and `fastmta suppress`."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastmta.errors import Scope as ReplyScope
from fastmta.feedback.classification import BounceType, Category, Classification, Outcome
from fastmta.feedback.suppression import Scope, SqliteSuppressionStore, Suppression
from fastmta.feedback.suppression_policy import SuppressionPolicy


def fastmta(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastmta", *args], capture_output=True, text=True, timeout=60,
                          input=stdin, cwd=cwd)


def _c(category: Category, bounce: BounceType, outcome: Outcome = Outcome.PERMANENT) -> Classification:
    return Classification(outcome, category, bounce, ReplyScope.RECIPIENT)


def test_scopes_persist_and_are_checked_case_insensitively(tmp_path: Path) -> None:
    store = SqliteSuppressionStore(tmp_path / "s.db")
    store.add(Suppression("Gone@Example.com", Scope.GLOBAL, "", "hard bounce", "hard_bounce", 1.0))
    store.add(Suppression("angry@example.org", Scope.DOMAIN, "news.shop.example", "complaint", "complaint", 1.0))
    store.add(Suppression("busy@example.net", Scope.LIST, "weekly", "unsubscribe", "unsubscribe", 1.0))
    store.close()
    store = SqliteSuppressionStore(tmp_path / "s.db")  # reopened: on disk
    assert store.check("gone@example.com") is not None
    assert store.check("angry@example.org") is None  # only from that sender domain
    hit = store.check("angry@example.org", sender_domain="NEWS.shop.example")
    assert hit is not None and hit.scope is Scope.DOMAIN
    assert store.check("busy@example.net", list_tag="monthly") is None
    assert store.check("busy@example.net", list_tag="weekly") is not None
    assert store.check("someone@else.example") is None
    assert store.remove("gone@example.com") == 1 and store.check("gone@example.com") is None
    # An operator can read it with any SQLite client while fastmta has it open (WAL).
    other = sqlite3.connect(str(tmp_path / "s.db"))
    assert other.execute("select count(*) from suppression").fetchone()[0] == 2
    other.close()
    store.close()
    assert (tmp_path / "s.db").stat().st_mode & 0o077 == 0


def test_expired_suppressions_no_longer_apply(tmp_path: Path) -> None:
    now = [1000.0]
    store = SqliteSuppressionStore(tmp_path / "s.db", clock=lambda: now[0])
    store.add(Suppression("a@b.example", Scope.GLOBAL, "", "operator", "operator", 1000.0, expires=2000.0))
    assert store.check("a@b.example") is not None
    now[0] = 2001.0
    assert store.check("a@b.example") is None


def test_policy_suppresses_the_recipient_only_when_the_recipient_is_the_problem(tmp_path: Path) -> None:
    store = SqliteSuppressionStore(tmp_path / "s.db")
    policy = SuppressionPolicy()
    assert policy.on_bounce(store, "gone@x.example", _c(Category.INVALID_RECIPIENT, BounceType.HARD), "550 5.1.1")
    # A block of *us* never suppresses the recipient, whatever the bounce type says.
    for category in (Category.REPUTATION_BLOCK, Category.AUTH_FAILURE, Category.POLICY, Category.RATE_LIMITED,
                     Category.CONTENT_FILTERED, Category.SPAM_OR_VIRUS):
        assert policy.on_bounce(store, f"{category.value}@x.example", _c(category, BounceType.HARD)) is None
    assert policy.on_bounce(store, "b2b@corp.example", _c(Category.INVALID_RECIPIENT, BounceType.SUSPECTED_FILTER)) is None
    # Soft bounces: the fifth within 30 days suppresses.
    full = _c(Category.MAILBOX_FULL, BounceType.SOFT, Outcome.TRANSIENT)
    results = [policy.on_bounce(store, "full@x.example", full, at=1000.0 + i * 86400) for i in range(5)]
    assert results[:4] == [None] * 4 and results[4] is not None
    assert store.check("full@x.example") is not None
    assert store.check("reputation_block@x.example") is None and store.check("b2b@corp.example") is None
    policy.on_complaint(store, "angry@x.example", "News.Shop.example")
    assert store.check("angry@x.example", sender_domain="news.shop.example") is not None
    policy.on_unsubscribe(store, "bye@x.example", "weekly")
    assert store.check("bye@x.example", list_tag="weekly") is not None
    assert store.check("bye@x.example", list_tag="offers") is None


def test_the_command_line_adds_lists_exports_and_imports(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    assert fastmta("suppress", "--db", db, "add", "x@y.example", "--reason", "asked by phone").returncode == 0
    assert fastmta("suppress", "--db", db, "add", "z@y.example", "--scope", "list").returncode == 2  # needs --value
    assert fastmta("suppress", "--db", db, "add", "not an address").returncode == 2
    listed = [json.loads(x) for x in fastmta("suppress", "--db", db, "list", "--json").stdout.splitlines()]
    assert [(e["address"], e["reason"], e["source"]) for e in listed] == [("x@y.example", "asked by phone", "operator")]
    # The plain listing is tab-separated (cut -f, a spreadsheet), a reason's escape codes made visible.
    assert fastmta("suppress", "--db", db, "add", "t@y.example", "--reason", "red \x1b[31m\tend").returncode == 0
    rows = [line.split("\t") for line in fastmta("suppress", "--db", db, "list").stdout.splitlines()]
    assert [r[:2] for r in rows] == [["t@y.example", "global"], ["x@y.example", "global"]] and len(rows[0]) == 7
    assert "\x1b" not in rows[0][3] and rows[0][3].startswith("red ") and rows[1][3] == "asked by phone"
    assert fastmta("suppress", "--db", db, "remove", "t@y.example").returncode == 0
    exported = fastmta("suppress", "--db", db, "export").stdout
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert rows[0]["address"] == "x@y.example" and rows[0]["scope"] == "global"
    src = tmp_path / "in.csv"
    src.write_text("address,scope,value,reason\nA@b.example,list,weekly,unsub\nbroken line,,,\nc@d.example,,,\n")
    out = fastmta("suppress", "--db", str(tmp_path / "t.db"), "import", str(src))
    assert out.returncode == 1 and "line 3" in out.stderr and "imported 2" in out.stdout
    assert fastmta("suppress", "--db", str(tmp_path / "t.db"), "remove", "c@d.example").returncode == 0
    assert fastmta("suppress", "--db", str(tmp_path / "t.db"), "remove", "c@d.example").returncode == 1
    assert "import" in fastmta("suppress", "--help").stdout


def test_the_command_line_never_writes_to_or_reads_a_list_nobody_uses(tmp_path: Path) -> None:
    # An operator's first hour: `cd DATA_DIR && fastmta suppress add ...` wrote ./suppressions.db while
    # serve reads suppression.db (the address kept being mailed), and a mistyped --db listed nothing, exit 0.
    data = tmp_path / "data"
    data.mkdir()
    added = fastmta("suppress", "add", "zz@dst.example", cwd=data)
    assert added.returncode == 0 and f"a new suppression database at {data / 'suppression.db'}" in added.stderr
    assert SqliteSuppressionStore(data / "suppression.db").check("zz@dst.example") is not None
    for action in (["list"], ["export"], ["remove", "zz@dst.example"]):
        out = fastmta("suppress", "--db", str(tmp_path / "typo" / "x.db"), *action)
        assert out.returncode == 2 and "no suppression database at" in out.stderr, out
    assert not (tmp_path / "typo").exists()
    db = str(data / "suppression.db")
    for bad in ("evil\x1b[31m@dst.example", "a@b@c.example", "@dst.example"):
        assert fastmta("suppress", "--db", db, "add", bad).returncode == 2, bad
    for days in ("-5", "0", "nan", "inf"):
        assert fastmta("suppress", "--db", db, "add", "e@dst.example", "--expires", days).returncode == 2, days
    # A list under the old default name (./suppressions.db) is named, not passed over for a new empty one.
    elsewhere = tmp_path / "old"
    elsewhere.mkdir()
    SqliteSuppressionStore(elsewhere / "suppressions.db").close()
    out = fastmta("suppress", "add", "o@dst.example", cwd=elsewhere)
    assert out.returncode == 2 and "under the old default name" in out.stderr and not (elsewhere / "suppression.db").exists()


def test_a_trailing_dot_on_the_domain_is_the_same_address(tmp_path: Path) -> None:
    # The engine sends bob@example.com. as bob@example.com (as Postfix does): a suppression of either
    # form stops both, and one kept with the dot by an older version is found under the plain form.
    path = tmp_path / "s.db"
    store = SqliteSuppressionStore(path)
    store.add(Suppression("Bob@Example.com.", Scope.GLOBAL, "", "hard bounce", "bounce", 1.0))
    assert store.check("bob@example.com") is not None and store.check("bob@example.com.") is not None
    store.close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO suppression VALUES ('old@example.net.', 'global', '', 'r', 'bounce', 1.0, NULL)")
    db.commit()
    db.close()
    store = SqliteSuppressionStore(path)
    assert store.check("old@example.net") is not None
    assert [s.address for s in store.entries("old@example.net")] == ["old@example.net"]
    store.close()


def test_a_store_sees_what_another_process_added(tmp_path: Path, monkeypatch: Any) -> None:
    """`fastmta serve` holds the store open while `fastmta suppress add` writes through another connection:
    the running store's in-memory filter (a certain "no" until then) must learn the new address."""

    path = tmp_path / "s.db"
    running = SqliteSuppressionStore(path)
    assert running.check("late@example.com") is None  # the filter said "no"
    operator = SqliteSuppressionStore(path)  # another connection, as another process has
    operator.add(Suppression("Late@Example.com", Scope.GLOBAL, "", "asked by phone", "operator", 1.0))
    operator.close()
    running.follow_changes()  # what the hot path does at most every FOLLOW_INTERVAL
    hit = running.check("late@example.com")
    assert hit is not None and hit.reason == "asked by phone"
    # The hot path looks by itself once the interval has passed.
    other = SqliteSuppressionStore(path)
    other.add(Suppression("later@example.com", Scope.LIST, "weekly", "unsubscribed", "operator", 2.0))
    other.close()
    assert not running.maybe("later@example.com")  # maybe() alone is two bit tests: it does not look
    monkeypatch.setattr(running, "_next_follow", 0.0)
    running.follow_if_due()  # what Screen.admit does once per message
    assert running.maybe("later@example.com")
    assert running.check("later@example.com", list_tag="weekly") is not None
    running.close()


def test_a_store_that_fell_behind_the_kept_changes_reads_the_whole_list(tmp_path: Path, monkeypatch: Any) -> None:
    import fastmta.feedback.suppression as suppression

    monkeypatch.setattr(suppression, "CHANGES_KEPT", 2)
    path = tmp_path / "s.db"
    running = SqliteSuppressionStore(path)
    for i in range(5):
        writer = SqliteSuppressionStore(path)  # each opening trims the changes to the last 2
        writer.add(Suppression(f"u{i}@example.com", Scope.GLOBAL, "", "hard bounce", "import", 1.0))
        writer.close()
    trimmed = SqliteSuppressionStore(path)
    assert trimmed._db.execute("SELECT MIN(seq) FROM suppression_change").fetchone()[0] > 1
    trimmed.close()
    running.follow_changes()
    assert all(running.check(f"u{i}@example.com") is not None for i in range(5))
    running.close()
