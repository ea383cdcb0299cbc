"""The store of delivery status notices owed (fastmta.serve.notice_store), on a real SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fastmta.queue.records import Outcome, Status
from fastmta.serve.notice_store import NoticeStore, encode
from fastmta.smtp.reply import Reply


def outcome(rcpt: str) -> Outcome:
    return Outcome("m1", rcpt, Status.BOUNCED, Reply(550, ("5.1.1 no such user",), "5.1.1"), 1, 10.0, 11.0,
                   mx_host="mx.b.test")


def test_what_is_stored_comes_back_until_removed(tmp_path: Path) -> None:
    store = NoticeStore(tmp_path / "notices")
    future = store.add([("k1", "s@a.test", b"Subject: hi\r\n", 0), ("k1", encode(outcome("a@b.test"))),
                        ("k1", encode(outcome("c@b.test")))])
    assert future is not None
    future.result(5)
    store.close()
    again = NoticeStore(tmp_path / "notices")  # a new process
    try:
        [owed] = again.owed()
        assert (owed.key, owed.sender, owed.headers, owed.kind) == ("k1", "s@a.test", b"Subject: hi\r\n", "failed")
        assert [(o.recipient, o.reply.code, o.reply.enhanced, o.mx_host) for o in owed.outcomes] == [
            ("a@b.test", 550, "5.1.1", "mx.b.test"), ("c@b.test", 550, "5.1.1", "mx.b.test")]
        again.remove("k1")
        assert again.owed() == []
    finally:
        again.close()


def test_a_failed_write_does_not_wedge_the_store(tmp_path: Path) -> None:
    # Found by an attack on serve: one failed DELETE (another process held the database locked) left the
    # connection inside a transaction; every later add and remove failed until a restart, and every
    # notice on disk was sent again at each start.
    store = NoticeStore(tmp_path / "notices")
    other = sqlite3.connect(tmp_path / "notices" / "notices.sqlite", timeout=0.1, isolation_level=None)
    try:
        store._db.execute("PRAGMA busy_timeout = 100")
        add = store.add([("k1", "s@a.test", b"", 0), ("k1", encode(outcome("a@b.test")))])
        assert add is not None
        add.result(5)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        store.remove("k1")  # fails (logged), rolled back
        late = store.add([("k2", "s@a.test", b"", 0), ("k2", encode(outcome("b@b.test")))])
        assert late is not None and late.exception(5) is not None
        other.execute("ROLLBACK")
        again = store.add([("k3", "s@a.test", b"", 0), ("k3", encode(outcome("c@b.test")))])
        assert again is not None
        again.result(5)  # the store works again
        store.remove("k1")
        assert [n.key for n in store.owed()] == ["k3"]
    finally:
        other.close()
        store.close()


def test_a_notice_the_queue_already_holds_is_not_queued_again(tmp_path: Path) -> None:
    # Found by an attack on serve: killed after a notice was queued and before its row was removed, the
    # restart delivered the queued notice at once, then queued the row's notice again (no longer in the
    # queue, so not refused as a duplicate): 24 of 48 senders got two. Rows whose notice the queue
    # recovered are now forgotten before the engine starts.
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine
    from fastmta.serve.auth import RelayPolicy
    from fastmta.serve.sender_notices import SenderNotices

    store = NoticeStore(tmp_path / "notices")
    for key in ("m1-dsnf1", "m2-dsnf2"):
        added = store.add([(key, "s@a.test", b"", 0), (key, encode(outcome("a@b.test")))])
        assert added is not None
        added.result(5)
    notices = SenderNotices(Engine(config_from_dict({})), hostname="mta.test", policy=RelayPolicy([], []),
                            store=None, owed=store)
    try:
        assert notices.load_owed(queued={"m1-dsnf1"}) == 1  # m1's is in the queue: only m2's goes
        assert [n.key for n in store.owed()] == ["m2-dsnf2"]
    finally:
        store.close()


def test_a_success_notice_and_the_dsn_parameters_survive_a_restart(tmp_path: Path) -> None:
    # What the client asked over SMTP (ENVID, ORCPT) is printed in the notice: a notice queued after a
    # crash must print it too, and still be the kind it was (a success notice is no failure notice).
    meta = {"via": "smtp", "dsn": {"envid": "order 9", "orcpt": {"a@b.test": "rfc822;A@b.test"}}}
    delivered = Outcome("m1", "a@b.test", Status.DELIVERED, Reply(250, ("2.0.0 ok",), "2.0.0"), 1, 10.0, 11.0,
                        mx_host="mx.b.test", meta=meta)
    store = NoticeStore(tmp_path / "notices")
    added = store.add([("k1", "s@a.test", b"Subject: hi\r\n", 2), ("k1", encode(delivered)),
                       ("k1", encode(outcome("c@b.test")))])
    assert added is not None
    added.result(5)
    store.close()
    again = NoticeStore(tmp_path / "notices")
    try:
        [owed] = again.owed()
        assert owed.kind == "relayed"
        first, second = owed.outcomes
        assert first.meta == {"dsn": {"envid": "order 9", "orcpt": {"a@b.test": "rfc822;A@b.test"}}}
        assert second.meta is None  # stored without parameters: none come back
    finally:
        again.close()
