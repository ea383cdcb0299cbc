"""The suppression store: who must not be mailed again, why, and since when.

What comes back from receivers (hard bounces, repeated soft bounces,
complaints, unsubscribes) becomes a suppression here, and every intake path
asks :meth:`SuppressionStore.check` before a recipient is queued. The
embedded default is SQLite in WAL mode: a real database an operator can
query (``sqlite3 suppressions.db 'select * from suppression'``); the
:class:`SuppressionStore` protocol is the seam for a shared store (Redis) in
a cluster.

Scopes, from widest to narrowest:

=========  ==============================  =========================================
scope      applies to                      typical reason
=========  ==============================  =========================================
global     every message to the address    hard bounce (the mailbox does not exist)
domain     mail from one sender domain     complaint (never again from that sender)
list       one list or campaign tag        unsubscribe (RFC 8058 one-click)
=========  ==============================  =========================================

The hot path (a million-row campaign) must not pay a database query per
recipient: the addresses with any suppression are kept in memory in a Bloom
filter (:class:`AddressFilter`, 4 bytes each); only a possible hit goes to
SQLite for the scope and reason.
"""

from __future__ import annotations

import csv
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol, TextIO

from fastmta.errors import DamagedFile
from fastmta.keyset import row_key

__all__ = [
    "Scope",
    "SqliteSuppressionStore",
    "Suppression",
    "SuppressionStore",
    "address_key",
]


class Scope(StrEnum):
    GLOBAL = "global"
    DOMAIN = "domain"  # scope value: the sender (From/envelope) domain
    LIST = "list"  # scope value: the list or campaign tag


@dataclass(frozen=True, slots=True)
class Suppression:
    address: str
    scope: Scope
    value: str  # "" for global, the domain or list tag otherwise
    reason: str
    source: str  # what recorded it: "hard_bounce", "complaint", "unsubscribe", "operator", "import", ...
    created: float  # wall clock
    expires: float | None = None  # None: until removed

    def as_row(self) -> list[str]:
        return [self.address, self.scope.value, self.value, self.reason, self.source, f"{self.created:.3f}",
                "" if self.expires is None else f"{self.expires:.3f}"]


CSV_HEADER = ["address", "scope", "value", "reason", "source", "created", "expires"]


def _mailbox(address: str) -> str:
    """*address* as the store keeps it: without surrounding space or a trailing dot on its domain.

    ``bob@example.com.`` is ``bob@example.com`` (the engine sends it so, as Postfix
    does): a suppression of either form must stop both.
    """
    return address.strip().rstrip(".")


def address_key(address: str) -> int:
    """A stable 64-bit key of *address* (case-insensitive: mailbox names are, in practice)."""
    return row_key("suppression", _mailbox(address).lower())


class AddressFilter:
    """Which addresses *may* be suppressed: a Bloom filter, 4 bytes an address, two probes.

    The intake check runs for every recipient of every message, so its cost
    is the hot path's: one ``lower()``, one ``hash()`` and two bit tests,
    about 0.3 µs whatever the list's size (a sorted array of keys cost a
    blake2b and a bisect over boxed integers: ~4 µs at a million). A "no" is
    certain; a "maybe" asks the database (false positives: ~0.4% at full
    load, each one query). Python's string hash is salted per process, which
    is fine: the filter lives in memory and is built from the database at
    open. Past its capacity it grows (rebuilt from the addresses it is given).
    """

    __slots__ = ("_bits", "_mask", "capacity", "count")

    def __init__(self, addresses: Iterable[str] = (), capacity: int = 1 << 20) -> None:
        addresses = list(addresses)
        self.capacity = max(capacity, 2 * len(addresses))
        nbits = 1 << max(23, (self.capacity * 32 - 1).bit_length())  # >= 32 bits an address
        self._bits = bytearray(nbits >> 3)
        self._mask = nbits - 1
        self.count = 0
        for a in addresses:
            self.add(a)

    def add(self, address: str) -> None:
        h = hash(_mailbox(address).lower())
        mask, bits = self._mask, self._bits
        i, j = h & mask, (h >> 32) & mask
        bits[i >> 3] |= 1 << (i & 7)
        bits[j >> 3] |= 1 << (j & 7)
        self.count += 1

    def __contains__(self, address: str) -> bool:
        h = hash(_mailbox(address).lower())
        mask, bits = self._mask, self._bits
        i, j = h & mask, (h >> 32) & mask
        return bool(bits[i >> 3] & (1 << (i & 7))) and bool(bits[j >> 3] & (1 << (j & 7)))


class SuppressionStore(Protocol):
    """What intake, inbound processing and the command line need of a suppression store."""

    def check(self, address: str, sender_domain: str = "", list_tag: str = "") -> Suppression | None:
        """The suppression that stops mail to *address* from *sender_domain* on *list_tag*, or None."""
        ...

    def add(self, suppression: Suppression) -> None: ...

    def remove(self, address: str, scope: Scope | None = None, value: str | None = None) -> int: ...

    def entries(self, address: str | None = None) -> Iterator[Suppression]: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppression (
    address  TEXT NOT NULL COLLATE NOCASE,
    scope    TEXT NOT NULL,
    value    TEXT NOT NULL COLLATE NOCASE,
    reason   TEXT NOT NULL,
    source   TEXT NOT NULL,
    created  REAL NOT NULL,
    expires  REAL,
    PRIMARY KEY (address, scope, value)
);
CREATE TABLE IF NOT EXISTS recipient (
    address        TEXT PRIMARY KEY COLLATE NOCASE,
    last_delivered REAL,
    last_bounce    REAL,
    bounce_type    TEXT,
    category       TEXT,
    delivered      INTEGER NOT NULL DEFAULT 0,
    bounced        INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS soft_bounce (
    address TEXT NOT NULL COLLATE NOCASE,
    at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS soft_bounce_address ON soft_bounce (address, at);
-- Every address a suppression row is written for, in commit order: how a store open in one process
-- (fastmta serve's) learns the suppressions another (fastmta suppress, an import) added since.
-- AUTOINCREMENT: a number is never given twice, so "after n" misses nothing.
CREATE TABLE IF NOT EXISTS suppression_change (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    address TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS suppression_added AFTER INSERT ON suppression
BEGIN INSERT INTO suppression_change (address) VALUES (new.address); END;
CREATE TRIGGER IF NOT EXISTS suppression_renamed AFTER UPDATE OF address ON suppression
BEGIN INSERT INTO suppression_change (address) VALUES (new.address); END;
"""

#: How often a store looks for suppressions other processes added (seconds): an operator's
#: ``fastmta suppress add`` stops a running service's mail within this.
FOLLOW_INTERVAL = 1.0
#: Changes kept for stores that were not looking (each opening trims the older ones); a store that
#: fell further behind reads the whole list again.
CHANGES_KEPT = 100_000


class SqliteSuppressionStore:
    """Suppressions and recipient history in one SQLite file (WAL; every change committed at once).

    The in-memory filter follows what other processes add: at most every :data:`FOLLOW_INTERVAL`
    seconds the hot path asks SQLite whether another connection committed (``PRAGMA
    data_version``, no disk read) and, if one did, notes the addresses of ``suppression_change``
    past the last one it read. Without this a running ``fastmta serve`` never saw an operator's
    ``fastmta suppress add`` (the filter answered a certain "no") until it was restarted.
    """

    #: Whether the filter follows ``suppression_change`` (the Redis store has its own feed).
    follows_changes = True

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # isolation_level=None: autocommit; each statement is its own durable
        # transaction (WAL + synchronous=FULL: on disk when execute returns).
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise DamagedFile(f"{path}: {exc} (the suppression list: restore it from a backup, or "
                              "import an export of it into a new file)") from None
        # Rows kept before addresses lost their trailing dot: taken to the plain form (a duplicate of a
        # row already there goes), so that they still stop the mail they were made to stop.
        self._db.execute("UPDATE OR IGNORE suppression SET address = rtrim(address, '.') WHERE address LIKE '%.'")
        self._db.execute("DELETE FROM suppression WHERE address LIKE '%.'")
        path.chmod(0o600)
        self._clock = clock
        # Read before the filter is built: what is committed in between is noted twice, never missed.
        (self._seen_change,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM suppression_change").fetchone()
        self._db.execute("DELETE FROM suppression_change WHERE seq <= ?", (self._seen_change - CHANGES_KEPT,))
        self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        self._next_follow = time.monotonic() + FOLLOW_INTERVAL
        self._filter = self._load_filter()

    def _load_filter(self) -> AddressFilter:
        return AddressFilter(a for (a,) in self._db.execute("SELECT DISTINCT address FROM suppression"))

    def _note(self, address: str) -> None:
        if self._filter.count >= self._filter.capacity:
            self._filter = self._load_filter()  # grown past its size: rebuilt twice as large
        self._filter.add(address)

    def follow_changes(self) -> None:
        """Note the suppressions other connections committed since the last look."""
        self._next_follow = time.monotonic() + FOLLOW_INTERVAL
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        if version == self._data_version:
            return  # nobody else committed anything (this connection's own adds are noted as made)
        self._data_version = version
        rows = self._db.execute("SELECT seq, address FROM suppression_change WHERE seq > ? ORDER BY seq",
                                (self._seen_change,))
        first = rows.fetchone()
        if first is None:
            return
        if first[0] != self._seen_change + 1:  # trimmed past what this store had read: read the whole list
            (self._seen_change,) = self._db.execute("SELECT MAX(seq) FROM suppression_change").fetchone()
            self._filter = self._load_filter()
            return
        last, address = first
        self._note(address)
        for last, address in rows:  # noqa: B007 - the last number read is kept after the loop
            self._note(address)
        self._seen_change = last

    # --- the hot path -----------------------------------------------------------

    def follow_if_due(self) -> None:
        """:meth:`follow_changes` if the last look is :data:`FOLLOW_INTERVAL` old (once per message, not
        per recipient: :meth:`maybe` stays two bit tests)."""
        if self.follows_changes and time.monotonic() >= self._next_follow:
            self.follow_changes()

    def maybe(self, address: str) -> bool:
        """Could *address* be suppressed in some scope? False is certain; True asks :meth:`check`.

        As current as the last :meth:`follow_if_due` (which :meth:`check` calls)."""
        return self._filter.count > 0 and address in self._filter

    def note_suppressed(self, address: str) -> None:
        """Another connection to the same database added a suppression of *address*: let the filter know."""
        self._note(address)

    def check(self, address: str, sender_domain: str = "", list_tag: str = "") -> Suppression | None:
        self.follow_if_due()
        if address not in self._filter:
            return None  # the common case: one hash and two bit tests in memory
        now = self._clock()
        rows = self._db.execute(
            "SELECT address, scope, value, reason, source, created, expires FROM suppression "
            "WHERE address = ? AND (expires IS NULL OR expires > ?) AND ("
            " scope = 'global' OR (scope = 'domain' AND value = ?) OR (scope = 'list' AND value = ?))"
            " ORDER BY CASE scope WHEN 'global' THEN 0 WHEN 'domain' THEN 1 ELSE 2 END LIMIT 1",
            (_mailbox(address), now, sender_domain, list_tag),
        ).fetchall()
        return _row(rows[0]) if rows else None

    # --- changes ----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """The changes made inside, on this store's connection, as one transaction: one fsync for the
        lot (fastmta.serve.feedback_loop's batches), all of them or none on an error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add(self, suppression: Suppression) -> None:
        """Record *suppression* (a newer one for the same address and scope replaces the older)."""
        self._db.execute(
            "INSERT INTO suppression (address, scope, value, reason, source, created, expires) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (address, scope, value) DO UPDATE SET "
            "reason = excluded.reason, source = excluded.source, created = excluded.created, "
            "expires = excluded.expires",
            (_mailbox(suppression.address), suppression.scope.value, suppression.value, suppression.reason,
             suppression.source, suppression.created, suppression.expires),
        )
        self._note(suppression.address)

    def add_batch(self, suppressions: Sequence[Suppression]) -> None:
        """Record all of *suppressions* in one transaction: one fsync for the lot (a group commit).

        Safe to call from a worker thread while the store's own connection
        serves :meth:`check` elsewhere: the batch writes through a connection
        of its own (SQLite serialises the writers; WAL lets readers go on), so
        no other statement can join or be rolled back with its transaction.
        The in-memory filter learns the addresses only once they are on disk.
        """
        if not suppressions:
            return
        db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO suppression (address, scope, value, reason, source, created, expires) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (address, scope, value) DO UPDATE SET "
                    "reason = excluded.reason, source = excluded.source, created = excluded.created, "
                    "expires = excluded.expires",
                    [(_mailbox(s.address), s.scope.value, s.value, s.reason, s.source, s.created, s.expires)
                     for s in suppressions],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.close()
        for s in suppressions:
            self._note(s.address)

    def remove(self, address: str, scope: Scope | None = None, value: str | None = None) -> int:
        """Remove suppressions of *address* (all, or of one scope/value); how many were removed."""
        sql, args = "DELETE FROM suppression WHERE address = ?", [_mailbox(address)]
        if scope is not None:
            sql += " AND scope = ?"
            args.append(scope.value)
        if value is not None:
            sql += " AND value = ?"
            args.append(value)
        removed = self._db.execute(sql, args).rowcount
        # The filter keeps the key: a false "maybe" costs one query, never a wrong answer.
        return int(removed)

    def entries(self, address: str | None = None) -> Iterator[Suppression]:
        sql = "SELECT address, scope, value, reason, source, created, expires FROM suppression"
        args: tuple[str, ...] = ()
        if address is not None:
            sql += " WHERE address = ?"
            args = (_mailbox(address),)
        for row in self._db.execute(sql + " ORDER BY address, scope, value", args):
            yield _row(row)

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM suppression").fetchone()[0])

    # --- recipient history (what the policies and the filter-bounce detector read) ---

    def note_delivered(self, address: str, at: float | None = None) -> None:
        when = self._clock() if at is None else at
        self._db.execute(
            "INSERT INTO recipient (address, last_delivered, delivered) VALUES (?, ?, 1) "
            "ON CONFLICT (address) DO UPDATE SET last_delivered = excluded.last_delivered, delivered = delivered + 1",
            (_mailbox(address), when),
        )

    def note_delivered_many(self, deliveries: Iterable[tuple[str, float, int]]) -> None:
        """:meth:`note_delivered` for many (address, last time, how many) in one executemany."""
        self._db.executemany(
            "INSERT INTO recipient (address, last_delivered, delivered) VALUES (?, ?, ?) "
            "ON CONFLICT (address) DO UPDATE SET last_delivered = excluded.last_delivered, "
            "delivered = delivered + excluded.delivered",
            ((_mailbox(address), at, n) for address, at, n in deliveries),
        )

    def note_bounce(self, address: str, bounce_type: str, category: str, at: float | None = None) -> None:
        when = self._clock() if at is None else at
        self._db.execute(
            "INSERT INTO recipient (address, last_bounce, bounce_type, category, bounced) VALUES (?, ?, ?, ?, 1) "
            "ON CONFLICT (address) DO UPDATE SET last_bounce = excluded.last_bounce, "
            "bounce_type = excluded.bounce_type, category = excluded.category, bounced = bounced + 1",
            (_mailbox(address), when, bounce_type, category),
        )
        if bounce_type == "soft":
            self._db.execute("INSERT INTO soft_bounce (address, at) VALUES (?, ?)", (_mailbox(address), when))

    def soft_bounces_since(self, address: str, since: float) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM soft_bounce WHERE address = ? AND at >= ?", (_mailbox(address), since)
        ).fetchone()
        return int(row[0])

    def last_delivered(self, address: str) -> float | None:
        row = self._db.execute("SELECT last_delivered FROM recipient WHERE address = ?", (_mailbox(address),)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # --- import / export (fastmta suppress) ---------------------------------------------

    def export_csv(self, out: TextIO) -> int:
        writer = csv.writer(out)
        writer.writerow(CSV_HEADER)
        n = 0
        for entry in self.entries():
            writer.writerow(entry.as_row())
            n += 1
        return n

    def import_csv(self, rows: Iterable[dict[str, str]], *, source: str = "import") -> tuple[int, list[str]]:
        """Add every row (columns as in :data:`CSV_HEADER`; only ``address`` is required); (added, errors)."""
        added, errors = 0, []
        now = self._clock()
        self._db.execute("BEGIN")
        try:
            for line, row in enumerate(rows, 2):
                address = (row.get("address") or "").strip()
                if "@" not in address or any(c in address for c in "\r\n\x00<> "):
                    errors.append(f"line {line}: not an address: {address[:60]!r}")
                    continue
                try:
                    scope = Scope((row.get("scope") or "global").strip().lower())
                except ValueError:
                    errors.append(f"line {line}: unknown scope {row.get('scope')!r} (global, domain or list)")
                    continue
                value = (row.get("value") or "").strip()
                if scope is not Scope.GLOBAL and not value:
                    errors.append(f"line {line}: scope {scope.value} needs a value")
                    continue
                expires = (row.get("expires") or "").strip()
                self.add(Suppression(
                    address, scope, value if scope is not Scope.GLOBAL else "",
                    (row.get("reason") or "imported").strip(), (row.get("source") or source).strip(),
                    float(row.get("created") or now), float(expires) if expires else None,
                ))
                added += 1
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return added, errors

    def close(self) -> None:
        self._db.close()


def _row(row: tuple[str, str, str, str, str, float, float | None]) -> Suppression:
    address, scope, value, reason, source, created, expires = row
    return Suppression(address, Scope(scope), value, reason, source, float(created),
                       None if expires is None else float(expires))
