"""Suppressions shared by the nodes of a cluster through Redis (``[cluster] suppression = true``).

In Redis (``prefix`` from ``[cluster]``, default ``fastmta:``)::

    {prefix}suppression       hash, the truth: field = the address in lower case, value = a JSON array
                              of its suppressions, one row per (scope, value):
                              [address, scope, value, reason, source, created, expires] (strings, the
                              columns of ``fastmta suppress export``)
    {prefix}suppression:seq   a counter: every change takes the next number
    {prefix}suppression       the pub/sub channel: [seq, address, new value or ""] for every change

Every change is one Lua script (read the address's rows, replace the one of the same scope and value or
drop the removed ones, HSET or HDEL, INCR, PUBLISH): atomic, so nodes changing one address at the same
time never lose each other's rows, and the published value is the truth as of that seq.

On each node, beside the single-node store's file (``DATA_DIR/suppression.db``):

* ``suppression.db`` (:class:`SqliteSuppressionStore`, unchanged) keeps the recipient history, per node
  (deliveries and bounces of the mail this node sent: the policies that read it look at their own node's
  recent past, and sharing it would put Redis on every delivery), and, in its ``suppression`` table, the
  **backlog**: this node's suppressions not yet in Redis. Whatever suppresses (the feedback loop's writer
  thread, ``fastmta suppress``) writes there first, durably, exactly as on a single node; the sync
  thread moves each row to Redis and deletes it once Redis has it. So nothing is lost while Redis is
  down, nor by a crash, and a node switched from single-node to cluster mode pushes its whole list at
  its first start. Removes wait in ``suppression_removed`` (pushed before the adds: a backlog add is
  always newer than a pending remove it matches, since a remove deletes the matching backlog rows).
* ``suppression.shared.db`` is this node's copy of the hash (address, rows, seq of the change that
  wrote it): rewritten from an ``HSCAN`` at each (re)connection, then kept by the published changes
  (applied only when newer than what it has: the seq orders the echo of a node's own push against the
  changes of the others). It survives restarts: a node started while Redis is down knows the list.

The intake check never waits for Redis. Its common case stays in memory: the Bloom filter
(:class:`AddressFilter`, 4 bytes an address) knows every address of the copy and of the backlog; only a
possible hit reads the two local SQLite files (the single-node store reads one). A copy in Python objects
would cost some 300 bytes of memory an address (300 MB at a million), the filter costs 4.

One thread per node talks to Redis, with redis-py's synchronous client (not asyncio tasks): the store is
used from the event loop (the check), from the feedback loop's writer thread and from the synchronous
``fastmta suppress``; a thread of its own applies the other nodes' changes within milliseconds even
while the event loop is busy with a campaign, and nothing on the event loop waits for Redis.

Degraded mode: when Redis is unreachable, the checks go on against the copy and the backlog (this
node's new suppressions are checked at once, as on a single node), the backlog grows on disk, and the
thread tries again every ``retry`` seconds; back, it pushes the backlog and reads the hash again. When
Redis comes back *empty* (restarted without persistence: its seq counter is behind this node's copy),
the node writes its copy back first, so the list survives even that. To empty the list, remove its
entries (``fastmta suppress remove``): a hash deleted by hand would be restored. Back to a single node:
``fastmta suppress --config CLUSTER.toml export``, then ``import`` with the single node's configuration.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from fastmta.feedback.suppression import AddressFilter, Scope, SqliteSuppressionStore, Suppression

log = logging.getLogger("fastmta.feedback.suppression")

__all__ = ["RedisSuppressionStore"]

# KEYS: the hash, the seq counter. ARGV: the channel, the field, "put" (a row replaces the one of its scope and
# value) or "keep" (a row goes in only where the address has none of its scope and value), the rows (JSON arrays).
_ADD = """
local cur = redis.call('HGET', KEYS[1], ARGV[2])
local rows = {}
if cur then
  local ok, decoded = pcall(cjson.decode, cur)
  if ok and type(decoded) == 'table' then rows = decoded end
end
local changed = false
for i = 4, #ARGV do
  local new = cjson.decode(ARGV[i])
  local kept, found = {}, false
  for _, r in ipairs(rows) do
    if r[2] ~= new[2] or string.lower(r[3]) ~= string.lower(new[3]) then kept[#kept + 1] = r else found = true end
  end
  if ARGV[3] == 'keep' and found then
    kept = rows
  else
    kept[#kept + 1] = new
    changed = true
  end
  rows = kept
end
if not changed then return {0, cur or '', 0} end
local blob = cjson.encode(rows)
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[2], blob)
redis.call('PUBLISH', ARGV[1], cjson.encode({seq, ARGV[2], blob}))
return {seq, blob, 0}
"""

_RAISE = "if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end"

# ARGV: the channel, the field, the scope ('' = any), '1' when ARGV[5] is the value to match ('0' = any).
_REMOVE = """
local cur = redis.call('HGET', KEYS[1], ARGV[2])
if not cur then return {0, '', 0} end
local ok, rows = pcall(cjson.decode, cur)
if not ok or type(rows) ~= 'table' then rows = {} end
local kept, removed = {}, 0
for _, r in ipairs(rows) do
  if (ARGV[3] == '' or r[2] == ARGV[3]) and (ARGV[4] ~= '1' or string.lower(r[3]) == string.lower(ARGV[5])) then
    removed = removed + 1
  else
    kept[#kept + 1] = r
  end
end
if removed == 0 and #rows > 0 then return {0, cur, 0} end
local blob = ''
if #kept == 0 then
  redis.call('HDEL', KEYS[1], ARGV[2])
else
  blob = cjson.encode(kept)
  redis.call('HSET', KEYS[1], ARGV[2], blob)
end
local seq = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[1], cjson.encode({seq, ARGV[2], blob}))
return {seq, blob, removed}
"""

#: Pending removes (scope, value NULL: any), in suppression.db; the copy of the hash, in suppression.shared.db.
_BACKLOG_SCHEMA = ("CREATE TABLE IF NOT EXISTS suppression_removed (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                   "address TEXT NOT NULL, scope TEXT, value TEXT)")
_SHARED_SCHEMA = ("CREATE TABLE IF NOT EXISTS suppression_shared (address TEXT PRIMARY KEY, entries TEXT NOT NULL, "
                  "seq INTEGER NOT NULL)")

#: A newer change replaces the copy's row; an older one (seq not above) is ignored. "" entries: none left.
_APPLY = (
    "INSERT INTO suppression_shared (address, entries, seq) VALUES (?, ?, ?) ON CONFLICT (address) DO UPDATE "
    "SET entries = excluded.entries, seq = excluded.seq WHERE excluded.seq > suppression_shared.seq"
)

_rows = msgspec.json.Decoder(list[list[str]])
_message = msgspec.json.Decoder(tuple[int, str, str])
_encode = msgspec.json.Encoder().encode
_PRIORITY = {Scope.GLOBAL: 0, Scope.DOMAIN: 1, Scope.LIST: 2}
#: Changes sent in one pipelined round trip.
_BATCH = 500
#: The sync thread's longest wait for a published change before it looks at its backlog again.
_POLL = 0.05
#: While idle: the backlog is read (other processes may write it) and Redis pinged this often.
_HEARTBEAT = 1.0


def _field(address: str) -> str:
    return address.strip().rstrip(".").lower()  # as the SQLite store keeps it (its _mailbox)


def _decode(blob: str | bytes) -> list[Suppression]:
    """The suppressions of one hash value (unreadable rows are skipped: a check must not fail)."""
    if not blob:
        return []
    try:
        rows = _rows.decode(blob)
    except msgspec.DecodeError:
        log.error("suppressions: an unreadable value in Redis: %r", blob[:80])
        return []
    out = []
    for row in rows:
        try:
            address, scope, value, reason, source, created, expires = row
            out.append(Suppression(address, Scope(scope), value, reason, source, float(created),
                                   float(expires) if expires else None))
        except (ValueError, TypeError):
            continue
    return out


def _applies(s: Suppression, sender_domain: str, list_tag: str, now: float) -> bool:
    if s.expires is not None and s.expires <= now:
        return False
    if s.scope is Scope.GLOBAL:
        return True
    want = sender_domain if s.scope is Scope.DOMAIN else list_tag
    return bool(want) and s.value.lower() == want.lower()


def _matches(s: Suppression, scope: Scope | None, value: str | None) -> bool:
    return (scope is None or s.scope is scope) and (value is None or s.value.lower() == value.lower())


def _key(s: Suppression) -> tuple[str, str]:
    return s.scope.value, s.value.lower()


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=60.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


class RedisSuppressionStore(SqliteSuppressionStore):
    """The suppression list shared through Redis; the recipient history stays in the local SQLite file.

    A :class:`SqliteSuppressionStore` (the same file, the same history, every caller unchanged) whose
    suppressions are the cluster's. ``start()`` runs the sync thread; without it (``fastmta suppress``)
    :meth:`sync` and :meth:`push` do the same work in the caller's thread.
    """

    follows_changes = False  # other processes' suppressions come through Redis (sync), not the local file

    def __init__(
        self, path: Path, url: str, *, prefix: str = "fastmta:", timeout: float = 0.5, retry: float = 1.0,
        clock: Callable[[], float] = time.time, client: Any = None,
    ) -> None:
        self.url = url
        self.key = self.channel = prefix + "suppression"
        self.seq_key = prefix + "suppression:seq"
        self.timeout = timeout
        self.retry = retry
        self.shared_path = path.with_name(f"{path.stem}.shared{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()  # the filter's writers (readers never lock)
        self._capture: list[str] | None = None  # addresses noted while the filter is being rebuilt
        self._regrow = False
        self._shared = _connect(self.shared_path)  # the caller's: checks, listings, local removes
        self._shared.execute(_SHARED_SCHEMA)
        self.shared_path.chmod(0o600)
        super().__init__(path, clock=clock)  # the history, the backlog, the filter (_load_filter below)
        self._db.execute(_BACKLOG_SCHEMA)
        self._sync_lock = threading.RLock()  # one sync at a time (the thread, or a caller without it)
        self._sync_db = _connect(path)
        self._sync_shared = _connect(self.shared_path)
        self._client: Any = client
        self._scripts: tuple[Any, Any] | None = None
        self._pubsub: Any = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._synced = threading.Event()
        self._tried = threading.Event()  # the first connection was attempted (synced or failed)
        #: Redis reachable and subscribed.
        self.connected = False
        self._warned = False
        self.pushed = 0  # changes this node wrote to Redis
        self.applied = 0  # changes of the hash applied to the copy (every node's, this one's echo too)
        self.resyncs = 0  # full reads of the hash
        self.reseeded = 0  # addresses written back to a Redis that came back empty

    # --- the filter -----------------------------------------------------------------

    def _load_filter(self) -> AddressFilter:
        """Every address of the backlog and of the copy (own connections: any thread may rebuild it)."""
        db, shared = sqlite3.connect(str(self.path)), sqlite3.connect(str(self.shared_path))
        try:
            return AddressFilter(itertools.chain(
                (a for (a,) in db.execute("SELECT DISTINCT address FROM suppression")),
                (a for (a,) in shared.execute("SELECT address FROM suppression_shared WHERE entries != ''")),
            ))
        finally:
            db.close()
            shared.close()

    def _note(self, address: str) -> None:
        with self._lock:
            self._filter.add(address)
            if self._capture is not None:
                self._capture.append(address)
            if self._filter.count >= self._filter.capacity:
                self._regrow = True  # rebuilt twice as large by the sync thread, not on the caller's time
                self._wake.set()

    def _rebuild_filter(self) -> None:
        """A new filter from the files; what is noted meanwhile goes into it too (no address is missed)."""
        with self._lock:
            self._capture, self._regrow = [], False
        new: AddressFilter | None = None
        try:
            new = self._load_filter()
        finally:
            with self._lock:
                captured, self._capture = self._capture or [], None
                if new is not None:
                    for a in captured:
                        new.add(a)
                    self._filter = new

    # --- the hot path -----------------------------------------------------------------

    def note_suppressed(self, address: str) -> None:
        """Another connection (the feedback loop's writer) put a suppression in the backlog: check it, push it."""
        self._note(address)
        self._wake.set()

    def check(self, address: str, sender_domain: str = "", list_tag: str = "") -> Suppression | None:
        if address not in self._filter:
            return None
        best = super().check(address, sender_domain, list_tag)  # this node's, not yet in Redis
        row = self._shared.execute("SELECT entries FROM suppression_shared WHERE address = ?",
                                   (_field(address),)).fetchone()
        if row is not None and row[0]:
            now = self._clock()
            for s in _decode(row[0]):
                if _applies(s, sender_domain, list_tag, now) and (
                        best is None or _PRIORITY[s.scope] < _PRIORITY[best.scope]):
                    best = s
        return best

    # --- changes (local first: durable at once, in Redis by the sync thread) ---------------------

    def add(self, suppression: Suppression) -> None:
        super().add(suppression)
        self._wake.set()

    def add_batch(self, suppressions: Sequence[Suppression]) -> None:
        super().add_batch(suppressions)
        self._wake.set()

    def remove(self, address: str, scope: Scope | None = None, value: str | None = None) -> int:
        """Lift suppressions here at once and, through the backlog, in Redis; how many (scope, value) went."""
        gone = {_key(s) for s in super().entries(address) if _matches(s, scope, value)}
        self._db.execute("BEGIN IMMEDIATE")
        try:
            super().remove(address, scope, value)
            self._db.execute("INSERT INTO suppression_removed (address, scope, value) VALUES (?, ?, ?)",
                             (_field(address), None if scope is None else scope.value, value))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        field = _field(address)
        self._shared.execute("BEGIN IMMEDIATE")
        try:
            row = self._shared.execute("SELECT entries FROM suppression_shared WHERE address = ?", (field,)).fetchone()
            if row is not None and row[0]:
                rows = _decode(row[0])
                kept = [s for s in rows if not _matches(s, scope, value)]
                gone.update(_key(s) for s in rows if _matches(s, scope, value))
                if len(kept) < len(rows):  # the seq stays: the next published change still applies
                    self._shared.execute("UPDATE suppression_shared SET entries = ? WHERE address = ?",
                                         (_encode([s.as_row() for s in kept]).decode() if kept else "", field))
            self._shared.execute("COMMIT")
        except BaseException:
            self._shared.execute("ROLLBACK")
            raise
        self._wake.set()
        return len(gone)

    def entries(self, address: str | None = None) -> Iterator[Suppression]:
        """The copy's suppressions with this node's backlog over them (by address, then the backlog's rest)."""
        backlog: dict[str, dict[tuple[str, str], Suppression]] = {}
        for s in super().entries(address):
            backlog.setdefault(_field(s.address), {})[_key(s)] = s
        sql = "SELECT address, entries FROM suppression_shared WHERE entries != ''"
        args: tuple[str, ...] = ()
        if address is not None:
            sql, args = sql + " AND address = ?", (_field(address),)
        for field, blob in self._shared.execute(sql + " ORDER BY address", args).fetchall():
            mine = backlog.pop(field, {})
            for s in _decode(blob):
                if _key(s) not in mine:
                    yield s
            yield from mine.values()
        for mine in backlog.values():
            yield from mine.values()

    def __len__(self) -> int:
        return sum(1 for _ in self.entries())

    def backlog(self) -> int:
        """Changes of this node not yet in Redis."""
        return _backlog(self._db)

    # --- Redis ------------------------------------------------------------------------

    def _redis(self) -> Any:
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # Fail fast, no retries of its own: a failure is degraded mode's to handle.
            self._client = redis.Redis.from_url(self.url, socket_timeout=self.timeout,
                                                socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0))
        if self._scripts is None:
            self._scripts = (self._client.register_script(_ADD), self._client.register_script(_REMOVE))
        return self._client

    def _apply(self, changes: Iterable[tuple[int, str, str]]) -> int:
        """Published (or returned) changes into the copy, in one transaction; how many."""
        changes = [c for c in changes if c[0] > 0]
        if not changes:
            return 0
        for _, field, blob in changes:
            if blob:
                self._note(field)  # before the copy has it: a "maybe" costs one query, a "no" must be right
        db = self._sync_shared
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_APPLY, [(field, blob, seq) for seq, field, blob in changes])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.applied += len(changes)
        return len(changes)

    def _push_batch(self) -> int:
        """Up to :data:`_BATCH` backlog changes to Redis (removes first); how many were pushed."""
        db = self._sync_db
        removes = db.execute("SELECT seq, address, scope, value FROM suppression_removed ORDER BY seq LIMIT ?",
                             (_BATCH,)).fetchall()
        adds = [] if len(removes) >= _BATCH else db.execute(
            "SELECT address, scope, value, reason, source, created, expires FROM suppression LIMIT ?",
            (_BATCH - len(removes),)).fetchall()
        if not removes and not adds:
            return 0
        client = self._redis()
        assert self._scripts is not None
        add, remove = self._scripts
        keys = [self.key, self.seq_key]
        pipe = client.pipeline(transaction=False)
        for _, address, scope, value in removes:
            remove(keys=keys, args=[self.channel, address, scope or "", "0" if value is None else "1", value or ""],
                   client=pipe)
        by_field: dict[str, list[bytes]] = {}
        for row in adds:
            address, scope, value, reason, source, created, expires = row
            s = Suppression(address, Scope(scope), value, reason, source, float(created),
                            None if expires is None else float(expires))
            by_field.setdefault(_field(address), []).append(_encode(s.as_row()))
        for field, blobs in by_field.items():
            add(keys=keys, args=[self.channel, field, "put", *blobs], client=pipe)
        results = pipe.execute()
        # The copy first, then the backlog rows go: the check finds each change in one or the other.
        self._apply((int(seq), _text(field), _text(blob)) for (seq, blob, _), field in
                    zip(results, [r[1] for r in removes] + list(by_field), strict=True))
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("DELETE FROM suppression_removed WHERE seq = ?", [(r[0],) for r in removes])
            # Only the row pushed: one replaced meanwhile by a newer add stays for the next push.
            db.executemany(
                "DELETE FROM suppression WHERE address = ? AND scope = ? AND value = ? AND reason = ? AND source = ? "
                "AND created = ? AND expires IS ?", adds)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.pushed += len(removes) + len(adds)
        return len(removes) + len(adds)

    def _push_all(self, limit: int = 10_000) -> None:
        for _ in range(limit):  # bounded: a writer faster than Redis cannot keep this thread here forever
            if not self._push_batch():
                return

    def _reseed(self) -> None:
        """Redis lost the list (its counter is behind this node's copy: restarted without persistence)? Restore it.

        The copy's rows go back where the address has none of that scope and value (a newer change wins),
        then the counter is raised past the copy's: the nodes with an older copy find nothing to restore.
        A remove made while Redis was down may be undone by another node's older copy: the safe direction.
        """
        client = self._redis()
        row = self._sync_shared.execute("SELECT MAX(seq) FROM suppression_shared").fetchone()
        mine = int(row[0] or 0) if row else 0
        if mine <= int(client.get(self.seq_key) or 0):
            return
        assert self._scripts is not None
        add = self._scripts[0]
        keys = [self.key, self.seq_key]
        cursor = self._sync_shared.execute("SELECT address, entries FROM suppression_shared WHERE entries != ''")
        n = 0
        for _ in range(100_000_000):
            chunk = cursor.fetchmany(_BATCH)
            if not chunk:
                break
            pipe = client.pipeline(transaction=False)
            for field, blob in chunk:
                add(keys=keys, args=[self.channel, field, "keep", *(_encode(s.as_row()) for s in _decode(blob))],
                    client=pipe)
            pipe.execute()
            n += len(chunk)
        client.eval(_RAISE, 1, self.seq_key, mine)
        self.reseeded += n
        log.warning("suppressions: Redis had lost the list; %d address(es) restored from this node's copy", n)

    def _resync(self) -> None:
        """The whole hash into the copy (one transaction: checks see the old copy until it is complete)."""
        client = self._redis()
        seq = int(client.get(self.seq_key) or 0)  # changes up to it are in what HSCAN reads
        db = self._sync_shared
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM suppression_shared")
            cursor = 0
            for _ in range(100_000_000):
                cursor, chunk = client.hscan(self.key, cursor, count=1000)
                db.executemany("INSERT OR REPLACE INTO suppression_shared (address, entries, seq) VALUES (?, ?, ?)",
                               [(_text(f), _text(v), seq) for f, v in chunk.items()])
                if not cursor:
                    break
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.resyncs += 1
        self._rebuild_filter()  # removed addresses leave it; it grows if it must

    def sync(self) -> bool:
        """In the caller's thread: push the backlog, then read the whole hash into the copy. False: unreachable."""
        try:
            with self._sync_lock:
                self._redis().ping()
                self._reseed()
                self._push_all()
                self._resync()
        except Exception as exc:
            self._failed(exc)
            return False
        return True

    def push(self) -> bool:
        """In the caller's thread: push the backlog. False: Redis unreachable (the backlog stays, on disk)."""
        try:
            with self._sync_lock:
                self._push_all()
                return _backlog(self._sync_db) == 0
        except Exception as exc:
            self._failed(exc)
            return False

    def _failed(self, exc: BaseException) -> None:
        if not self._closing.is_set() and (self.connected or not self._warned):
            log.warning("suppressions: Redis %s unreachable (%s: %s); checking against this node's copy, "
                        "its new suppressions kept on disk", self.url, type(exc).__name__, exc)
            self._warned = True
        self.connected = False
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):  # a dead connection may fail to close: dropped either way
                pubsub.close()

    # --- the sync thread ----------------------------------------------------------------

    def start(self) -> None:
        """Run the sync thread: subscribe, push the backlog, read the hash, then follow the changes."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fastmta-suppression-sync", daemon=True)
            self._thread.start()

    def wait_synced(self, timeout: float) -> bool:
        """Until the first full read of the hash (True) or the first failure to reach Redis (False), or *timeout*.

        A reachable Redis with a long list may take seconds to read; an unreachable one is not waited for.
        """
        self._tried.wait(timeout)
        return self._synced.is_set()

    def _open(self) -> None:
        client = self._redis()
        pubsub = client.pubsub()
        self._pubsub = pubsub
        pubsub.subscribe(self.channel)
        deadline = time.monotonic() + 4 * self.timeout
        while True:  # subscribed before the hash is read: no change falls between the two
            message = pubsub.get_message(timeout=self.timeout)
            if message is not None and message.get("type") == "subscribe":
                break
            if time.monotonic() > deadline:
                raise TimeoutError("no confirmation of SUBSCRIBE")
        with self._sync_lock:
            self._reseed()
            self._push_all()
            self._resync()
        if not self.connected:
            log.info("suppressions: shared through Redis %s (%s)", self.url, self.key)
        self.connected, self._warned = True, False
        self._synced.set()
        self._tried.set()

    def _drain(self, timeout: float) -> None:
        """Apply what was published (in order, one transaction for all that waits)."""
        changes: list[tuple[int, str, str]] = []
        message = self._pubsub.get_message(timeout=timeout)
        while message is not None and len(changes) < 10_000:
            if message.get("type") == "message":
                try:
                    changes.append(_message.decode(message["data"]))
                except msgspec.DecodeError:
                    log.error("suppressions: an unreadable change on %s: %r", self.channel, message["data"][:80])
            message = self._pubsub.get_message(timeout=0.0)
        if changes:
            with self._sync_lock:
                self._apply(changes)

    def _run(self) -> None:
        beat = 0.0
        while not self._closing.is_set():
            try:
                if self._pubsub is None:
                    self._open()
                    beat = time.monotonic()
                now = time.monotonic()
                if self._wake.is_set() or now - beat >= _HEARTBEAT:
                    self._wake.clear()
                    with self._sync_lock:
                        if now - beat >= _HEARTBEAT:
                            beat = now
                            self._redis().ping()  # a silent network loses no change unnoticed
                        self._push_all()
                if self._regrow:
                    self._rebuild_filter()
                self._drain(_POLL)
            except Exception as exc:
                self._failed(exc)
                self._tried.set()
                self._closing.wait(self.retry)
        if self.connected:
            self.push()  # the last of the backlog, if Redis takes it now (else at the next start)

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(8 * self.timeout + 2 * _POLL + 1.0)
        self._failed(ConnectionError("closed"))
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        self._sync_db.close()
        self._sync_shared.close()
        self._shared.close()
        super().close()


def _backlog(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT (SELECT COUNT(*) FROM suppression) + (SELECT COUNT(*) FROM suppression_removed)").fetchone()
    return int(row[0])


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
