"""Delivery status notices owed to senders, on disk until the notice itself is queued.

A notice gathers a message's failed recipients for a second before it is
queued as mail (one notice a message, not one a recipient). A ``kill -9`` in
that second lost it for good: the bounces it reports were on disk (never tried
again), the sender was never told. So what a notice will say is stored first,
by the spool's writer before the journal batch that holds those bounces
(:meth:`fastmta.serve.sender_notices.SenderNotices.before_journal`), and
deleted once the notice is queued (durably: ``Engine.submit`` returned), or
once it is decided that none goes (a rate limit, a suppressed sender). What a
start finds here is queued then, unless the queue holds it already (a crash
between the queueing and the delete: its message id is its key). A store that
cannot be written in time is not waited for a while (see
:mod:`fastmta.serve.events`, which shares the rule), and a crash then may lose
a notice.

SQLite (WAL, ``synchronous=NORMAL``: a committed write survives a process
crash), every call on one worker thread (``concurrent.futures`` executor).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from fastmta.errors import DamagedFile
from fastmta.queue.records import Outcome, Status
from fastmta.smtp.dsn_params import DSN_META, dsn_of, orcpt_of
from fastmta.smtp.reply import Reply

__all__ = ["KINDS", "NoticeStore", "OwedNotice"]

log = logging.getLogger("fastmta.serve.dsn")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notices (key TEXT PRIMARY KEY, sender TEXT NOT NULL, headers BLOB NOT NULL,
                                    delayed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outcomes (id INTEGER PRIMARY KEY, key TEXT NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS outcomes_key ON outcomes (key);
"""


class _Stored(msgspec.Struct, array_like=True):
    """What a notice says of one recipient (the fields ``SenderNotices.build`` reads)."""

    message_id: str
    recipient: str
    status: str
    code: int
    lines: list[str]
    enhanced: str | None
    queued_at: float
    time: float
    mx_host: str | None
    # Added with DSN (RFC 3461): absent in rows stored before, which had none.
    envid: str | None = None
    orcpt: str | None = None


#: What a notice tells: a failure, a delay, or a relay (NOTIFY=SUCCESS), stored as its index (column
#: "delayed": 0 and 1 were its two values before success notices came).
KINDS = ("failed", "delayed", "relayed")


class OwedNotice(NamedTuple):
    key: str
    sender: str
    outcomes: list[Outcome]
    headers: bytes  # what is returned of the message: its header section, or all of it (RET=FULL)
    kind: str  # one of KINDS


#: (key, sender, returned content, KINDS index) of a new notice, or (key, encoded outcome) of one more recipient.
Row = tuple[str, str, bytes, int] | tuple[str, bytes]


def encode(outcome: Outcome) -> bytes:
    r = outcome.reply
    dsn = dsn_of(outcome.meta)
    return msgspec.json.encode(_Stored(
        outcome.message_id, outcome.recipient, outcome.status.value, r.code, list(r.lines), r.enhanced,
        outcome.queued_at, outcome.time, outcome.mx_host, dsn.get("envid") if dsn else None,
        orcpt_of(outcome.meta, outcome.recipient),
    ))


def _decode(body: bytes) -> Outcome:
    s = msgspec.json.decode(body, type=_Stored)
    dsn: dict[str, Any] = {}
    if s.envid is not None:
        dsn["envid"] = s.envid
    if s.orcpt is not None:
        dsn["orcpt"] = {s.recipient: s.orcpt}
    return Outcome(s.message_id, s.recipient, Status(s.status), Reply(s.code, tuple(s.lines), s.enhanced), 0,
                   s.queued_at, s.time, mx_host=s.mx_host, meta={DSN_META: dsn} if dsn else None)


class NoticeStore:
    """The notices owed, in ``directory/notices.sqlite``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notices.sqlite"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Opened here, used only on the worker thread after this (started by the first call).
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise DamagedFile(f"{self.path}: {exc} (delivery status notices owed; move it aside to start afresh: "
                              "the notices it holds are then not sent)") from None
        self._db = db
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fastmta-notices")
        self._closed = False

    def add(self, rows: list[Row]) -> Future[None] | None:
        """Store *rows* (on the worker thread); the future is done once they are committed.

        None once closed (the rows are lost with the process: logged)."""
        if self._closed:
            log.error("%s closed: %d row(s) of notices owed not stored", self.path, len(rows))
            return None
        return self._executor.submit(self._add, rows)

    def _add(self, rows: list[Row]) -> None:
        with self._transaction() as db:
            for row in rows:
                if len(row) == 4:
                    db.execute("INSERT OR IGNORE INTO notices VALUES (?, ?, ?, ?)", row)
                else:
                    db.execute("INSERT INTO outcomes (key, body) VALUES (?, ?)", row)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, rolled back on any failure: a failed write (a locked or full database)
        must not leave the connection inside a transaction, where every later one fails too."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def remove(self, key: str) -> None:
        """Forget the notice *key* (queued, or not to be sent): after every add submitted before."""
        if not self._closed:  # closed: a notice queued after the service stopped is owed still, sent again
            self._executor.submit(self._remove, key)

    def _remove(self, key: str) -> None:
        try:
            with self._transaction() as db:
                db.execute("DELETE FROM outcomes WHERE key = ?", (key,))
                db.execute("DELETE FROM notices WHERE key = ?", (key,))
        except (sqlite3.Error, OSError) as exc:
            # Still on disk: the next start forgets it if it is still queued (its id is the key), else sends it again.
            log.error("%s: notice %s could not be removed: %s", self.path, key, exc)

    def owed(self) -> list[OwedNotice]:
        """Every notice stored and not removed (what a crash left), oldest first."""
        return self._executor.submit(self._owed).result()

    def _owed(self) -> list[OwedNotice]:
        out = []
        notices = self._db.execute("SELECT key, sender, headers, delayed FROM notices ORDER BY rowid").fetchall()
        for key, sender, headers, kind in notices:
            bodies = self._db.execute("SELECT body FROM outcomes WHERE key = ? ORDER BY id", (key,)).fetchall()
            outcomes = []
            for (body,) in bodies:
                try:
                    outcomes.append(_decode(body))
                except (msgspec.DecodeError, ValueError) as exc:  # the notice says what the others say
                    log.error("%s: notice %s: a damaged recipient row left out: %s", self.path, key, exc)
            if outcomes:
                if kind not in (0, 1, 2):  # a damaged row: the notice still goes, as the failure it most likely is
                    log.error("%s: notice %s: unknown kind %r, sent as a failure notice", self.path, key, kind)
                    kind = 0
                out.append(OwedNotice(key, sender, outcomes, bytes(headers), KINDS[kind]))
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.submit(self._db.close).result()
        self._executor.shutdown(wait=True)
