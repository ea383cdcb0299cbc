"""Suppressions shared through a real redis-server (tests/redisproc.py): several nodes, one list.

The issue's test: a recipient suppressed through one node is skipped by the
others within a second. Each "node" here is a RedisSuppressionStore with a
data directory of its own, as each `fastmta serve` of a cluster has; the
last test runs two real `fastmta serve` processes on one Redis.
Every wait is a bounded poll.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fastmta.feedback.suppression import Scope, SqliteSuppressionStore, Suppression
from fastmta.feedback.suppression_redis import RedisSuppressionStore
from redisproc import RedisProc, have_redis, redis_server

pytestmark = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed (Debian: redis-server)")


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProc]:
    with redis_server() as r:
        yield r


def _prefix() -> str:
    return f"t{time.monotonic_ns()}:"


def _node(tmp_path: Path, name: str, url: str, prefix: str, *, start: bool = True) -> RedisSuppressionStore:
    store = RedisSuppressionStore(tmp_path / name / "suppression.db", url, prefix=prefix, timeout=0.5, retry=0.2)
    if start:
        store.start()
    return store


def _within(pred: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until *pred* held (polled every 5 ms), or None if it did not within *timeout*."""
    t0 = time.monotonic()
    for _ in range(int(timeout / 0.005) + 1):
        if pred():
            return time.monotonic() - t0
        time.sleep(0.005)
    return None


def _s(address: str, scope: Scope = Scope.GLOBAL, value: str = "", source: str = "hard_bounce") -> Suppression:
    return Suppression(address, scope, value, source.replace("_", " "), source, time.time())


def test_a_suppression_added_at_one_node_is_seen_by_the_other_within_a_second(tmp_path: Path, redis: RedisProc) -> None:
    prefix = _prefix()
    a, b = _node(tmp_path, "a", redis.url, prefix), _node(tmp_path, "b", redis.url, prefix)
    try:
        assert a.wait_synced(5) and b.wait_synced(5)
        a.add(_s("Gone@Dest.example"))
        assert a.check("gone@dest.example") is not None  # at the node that added it: at once, Redis or not
        took = _within(lambda: b.check("gone@dest.example") is not None, 2.0)
        assert took is not None and took < 1.0, took
        hit = b.check("GONE@dest.example")
        assert hit is not None and hit.scope is Scope.GLOBAL and hit.source == "hard_bounce"
        assert b.maybe("gone@dest.example")

        # Narrower scopes keep their meaning across nodes.
        b.add(_s("angry@dest.example", Scope.DOMAIN, "news.shop.example", "complaint"))
        b.add(_s("angry@dest.example", Scope.LIST, "weekly", "unsubscribe"))
        took = _within(lambda: a.check("angry@dest.example", list_tag="weekly") is not None, 2.0)
        assert took is not None and took < 1.0, took
        assert a.check("angry@dest.example") is None
        assert a.check("angry@dest.example", list_tag="monthly") is None
        hit = a.check("angry@dest.example", sender_domain="NEWS.shop.example", list_tag="weekly")
        assert hit is not None and hit.scope is Scope.DOMAIN  # the wider scope first
        assert sorted((s.scope.value, s.value) for s in a.entries("angry@dest.example")) == [
            ("domain", "news.shop.example"), ("list", "weekly")]

        # The way the service writes: the feedback loop's writer thread has its own connection to the
        # node's file, then tells the node's store (note_suppressed), which pushes it.
        writer = SqliteSuppressionStore(tmp_path / "a" / "suppression.db")
        writer.add(_s("bounced@dest.example"))
        writer.close()
        a.note_suppressed("bounced@dest.example")
        assert a.check("bounced@dest.example") is not None
        took = _within(lambda: b.check("bounced@dest.example") is not None, 2.0)
        assert took is not None and took < 1.0, took

        # Removal, likewise: one scope, then everything.
        assert b.remove("angry@dest.example", Scope.LIST) == 1
        assert b.check("angry@dest.example", list_tag="weekly") is None  # at once where it was removed
        took = _within(lambda: a.check("angry@dest.example", list_tag="weekly") is None, 2.0)
        assert took is not None and took < 1.0, took
        assert a.check("angry@dest.example", sender_domain="news.shop.example") is not None
        assert a.remove("gone@dest.example") == 1
        took = _within(lambda: b.check("gone@dest.example") is None, 2.0)
        assert took is not None and took < 1.0, took
        assert _within(lambda: a.backlog() == 0 and b.backlog() == 0, 2.0) is not None
    finally:
        a.close()
        b.close()
    # The truth is one hash in Redis, readable by anybody.
    import redis as redislib

    client = redislib.Redis.from_url(redis.url)
    try:
        shared = {k.decode(): json.loads(v) for k, v in client.hgetall(prefix + "suppression").items()}
    finally:
        client.close()
    assert set(shared) == {"angry@dest.example", "bounced@dest.example"}
    assert [row[1:3] for row in shared["angry@dest.example"]] == [["domain", "news.shop.example"]]


def test_a_node_started_later_loads_the_list_and_an_old_single_node_list_is_pushed(
    tmp_path: Path, redis: RedisProc,
) -> None:
    prefix = _prefix()
    # A node that ran alone before: its SQLite list becomes the cluster's at its first start.
    old = SqliteSuppressionStore(tmp_path / "a" / "suppression.db")
    old.add(_s("old@dest.example"))
    old.add(_s("busy@dest.example", Scope.LIST, "weekly", "unsubscribe"))
    old.close()
    a = _node(tmp_path, "a", redis.url, prefix)
    try:
        assert a.wait_synced(5)
        assert _within(lambda: a.backlog() == 0, 2.0) is not None
        a.add(_s("new@dest.example"))
        assert _within(lambda: a.backlog() == 0, 2.0) is not None
        c = _node(tmp_path, "c", redis.url, prefix)
        try:
            assert c.wait_synced(5)
            assert c.check("old@dest.example") is not None and c.check("new@dest.example") is not None
            assert c.check("busy@dest.example", list_tag="weekly") is not None
            assert c.check("busy@dest.example") is None and c.check("nobody@dest.example") is None
            assert len(c) == 3
        finally:
            c.close()
    finally:
        a.close()
    # The copy survives a restart: a node started with Redis unreachable still knows the list.
    offline = RedisSuppressionStore(tmp_path / "c" / "suppression.db", "redis://127.0.0.1:1/0", prefix=prefix,
                                    timeout=0.2, retry=0.2)
    try:
        offline.start()
        t0 = time.monotonic()
        assert not offline.wait_synced(30)  # Redis does not answer: not waited for (the service starts at once)
        assert time.monotonic() - t0 < 5
        assert offline.check("old@dest.example") is not None and offline.check("new@dest.example") is not None
    finally:
        offline.close()


def test_with_redis_down_checks_go_on_and_new_suppressions_reach_it_when_it_is_back(
    tmp_path: Path, redis: RedisProc,
) -> None:
    prefix = _prefix()
    a, b = _node(tmp_path, "a", redis.url, prefix), _node(tmp_path, "b", redis.url, prefix)
    try:
        assert a.wait_synced(5) and b.wait_synced(5)
        a.add(_s("before@dest.example"))
        a.add(_s("kept@dest.example"))
        assert _within(lambda: b.check("kept@dest.example") is not None, 2.0) is not None
        redis.kill()
        assert _within(lambda: not a.connected and not b.connected, 5.0) is not None
        # Down: every check still answers from the node's copy and backlog; new suppressions stay on disk.
        assert a.check("before@dest.example") is not None and b.check("before@dest.example") is not None
        a.add(_s("during@dest.example"))
        b.add(_s("other@dest.example", Scope.LIST, "weekly", "unsubscribe"))
        assert b.remove("before@dest.example") == 1
        assert a.check("during@dest.example") is not None and b.check("during@dest.example") is None
        assert b.check("before@dest.example") is None and a.check("before@dest.example") is not None
        assert a.backlog() == 1 and b.backlog() == 2
        # A node's process may even stop meanwhile: its backlog is in its file.
        a.close()
        # Redis comes back empty (no persistence): B, the first back, restores the list from its copy,
        # then pushes what it did meanwhile.
        redis.restart()
        assert _within(lambda: b.connected and b.backlog() == 0, 10.0) is not None
        assert b.reseeded == 1  # kept@: the addresses of its copy (before@ it had removed)
        a = _node(tmp_path, "a", redis.url, prefix)
        assert a.check("during@dest.example") is not None and a.backlog() == 1  # from its file, Redis or not
        assert a.wait_synced(5) and _within(lambda: a.backlog() == 0, 2.0) is not None
        assert a.reseeded == 0  # its copy is no newer than what B restored
        assert _within(lambda: b.check("during@dest.example") is not None, 2.0) is not None
        assert a.check("other@dest.example", list_tag="weekly") is not None
        # What was suppressed before the outage survived it, and the remove made during it holds.
        assert a.check("kept@dest.example") is not None and b.check("kept@dest.example") is not None
        assert a.check("before@dest.example") is None and b.check("before@dest.example") is None
        c = _node(tmp_path, "c", redis.url, prefix)
        try:
            assert c.wait_synced(5)
            assert c.check("during@dest.example") is not None and c.check("kept@dest.example") is not None
            assert c.check("other@dest.example", list_tag="weekly") is not None
            assert c.check("before@dest.example") is None
        finally:
            c.close()
    finally:
        a.close()
        b.close()


async def _inject(host: str, port: int, rcpt: str, subject: str) -> None:
    import aiosmtplib

    msg = f"From: app@sender.example\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
        await smtp.sendmail("app@sender.example", [rcpt], msg)


def _final(records: list[dict[str, object]], rcpt: str) -> list[str]:
    return [str(r["status"]) for r in records if r.get("recipient") == rcpt and r["status"] != "deferred"]


@pytest.mark.interop
def test_two_services_on_one_redis_skip_what_either_suppressed_within_a_second(
    tmp_path: Path, redis: RedisProc,
) -> None:
    """Two `fastmta serve` processes: a hard bounce at node 1, an operator's add at node 2; each skipped by the other."""
    from serveproc import capture_sink, serve_config, served

    prefix = _prefix()
    cluster = f'[cluster]\nredis = "{redis.url}"\nprefix = "{prefix}"\nsuppression = true\nretry = 0.2\n'
    with capture_sink(tmp_path / "capture", "--unknown-recipient", "gone*") as sink:
        cfgs, datas = [], []
        for name in ("n1", "n2"):
            data = tmp_path / name / "data"
            cfg = tmp_path / name / "fastmta.toml"
            cfg.parent.mkdir()
            cfg.write_text(serve_config(data, sink, extra=cluster, http=False))
            cfgs.append(cfg)
            datas.append(data)
        with served(cfgs[0], datas[0]) as n1, served(cfgs[1], datas[1]) as n2:
            # Node 1 sends to a mailbox that does not exist: a hard bounce, so a global suppression.
            asyncio.run(_inject(*n1.smtp, "gone@dest.example", "one"))
            n1.wait_accounting(lambda rs: "bounced" in _final(rs, "gone@dest.example"))
            seen = time.monotonic()
            # A second later (the bound) node 2 takes a message for it: recorded, never queued.
            time.sleep(max(0.0, seen + 1.0 - time.monotonic()))
            asyncio.run(_inject(*n2.smtp, "gone@dest.example", "two"))
            records = n2.wait_accounting(lambda rs: bool(_final(rs, "gone@dest.example")), timeout=20)
            assert _final(records, "gone@dest.example") == ["suppressed"]
            hit = next(r for r in records if r["status"] == "suppressed")
            assert hit["bounce_reason"] == "global hard_bounce"

            # The operator, through node 2's configuration: in Redis at once, skipped by node 1.
            add = subprocess.run([sys.executable, "-m", "fastmta", "suppress", "--config", str(cfgs[1]), "add",
                                  "ops@dest.example", "--reason", "asked by phone"],
                                 capture_output=True, text=True, timeout=60)
            assert add.returncode == 0, add.stderr
            done = time.monotonic()
            time.sleep(max(0.0, done + 1.0 - time.monotonic()))
            asyncio.run(_inject(*n1.smtp, "ops@dest.example", "three"))
            records = n1.wait_accounting(lambda rs: bool(_final(rs, "ops@dest.example")), timeout=20)
            assert _final(records, "ops@dest.example") == ["suppressed"]
            # Both in the shared list, as any node's configuration shows it.
            listed = subprocess.run([sys.executable, "-m", "fastmta", "suppress", "--config", str(cfgs[0]), "list",
                                     "--json"], capture_output=True, text=True, timeout=60)
            assert listed.returncode == 0, listed.stderr
            rows = {json.loads(line)["address"]: json.loads(line) for line in listed.stdout.splitlines()}
            assert set(rows) == {"gone@dest.example", "ops@dest.example"}
            assert rows["gone@dest.example"]["source"] == "hard_bounce" and rows["ops@dest.example"]["source"] == "operator"
            # Each node's recipient history stays its own: node 1 sent the message that bounced.
            for data, bounced in ((datas[0], 1), (datas[1], 0)):
                db = sqlite3.connect(str(data / "suppression.db"))
                try:
                    got = db.execute("SELECT COALESCE(SUM(bounced), 0) FROM recipient").fetchone()[0]
                finally:
                    db.close()
                assert got == bounced


def test_the_command_line_changes_the_cluster_list_and_keeps_a_change_while_redis_is_down(
    tmp_path: Path, redis: RedisProc,
) -> None:
    prefix = _prefix()

    def config(url: str) -> Path:
        path = tmp_path / "fastmta.toml"
        path.write_text(f'[cluster]\nredis = "{url}"\nprefix = "{prefix}"\nsuppression = true\n\n'
                        f'[serve]\ndata_dir = "{tmp_path / "data"}"\n')
        return path

    def suppress(url: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fastmta", "suppress", "--config", str(config(url)), *args],
                              capture_output=True, text=True, timeout=60)

    node = _node(tmp_path, "node", redis.url, prefix)
    try:
        assert node.wait_synced(5)
        r = suppress(redis.url, "add", "ann@dest.example", "--scope", "list", "--value", "weekly")
        assert r.returncode == 0, r.stderr
        assert _within(lambda: node.check("ann@dest.example", list_tag="weekly") is not None, 1.0) is not None
        # Redis unreachable: the change waits in the data directory's backlog (exit status 1)...
        r = suppress("redis://127.0.0.1:1/0", "add", "bob@dest.example")
        assert r.returncode == 1 and "waits in" in r.stderr
        assert node.check("bob@dest.example") is None
        # ... and goes with the next change or listing that reaches Redis.
        r = suppress(redis.url, "list", "--json")
        assert r.returncode == 0, r.stderr
        assert sorted(json.loads(line)["address"] for line in r.stdout.splitlines()) == [
            "ann@dest.example", "bob@dest.example"]
        assert _within(lambda: node.check("bob@dest.example") is not None, 1.0) is not None
        r = suppress(redis.url, "remove", "ann@dest.example")
        assert (r.returncode, r.stdout.strip()) == (0, "removed 1"), r.stderr
        assert _within(lambda: node.check("ann@dest.example", list_tag="weekly") is None, 1.0) is not None
        assert suppress(redis.url, "remove", "nobody@dest.example").returncode == 1
    finally:
        node.close()
    db = sqlite3.connect(str(tmp_path / "data" / "suppression.db"))
    try:  # the backlog is empty again: everything is in Redis
        assert db.execute("SELECT COUNT(*) FROM suppression").fetchone()[0] == 0
    finally:
        db.close()
