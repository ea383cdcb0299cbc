"""`fastmta serve` end to end (issue 14): the real process, real clients, real receivers, on loopback.

Every way in (curl on the HTTP API, aiosmtplib, the pickup directory), every
way out (capture sinks, webhooks to an aiohttp server of the test's own),
queue control through ``python -m fastmta queue``, DKIM checked by dkimpy,
metrics parsed by prometheus_client, signals (SIGHUP under load, SIGTERM
drain) and readiness on a filesystem too small to take mail. Every process
binds port 0 and is stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import dkim as dkimpy
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from prometheus_client.parser import text_string_to_metric_families

from fastmta.message import core
from serveproc import Served, capture_sink, captured, serve_config, serve_log, served, start_serve, stop_serve

pytestmark = pytest.mark.interop

TOKEN = "e2e-token-0123456789abcdef"
TOKEN_SHA = hashlib.sha256(TOKEN.encode()).hexdigest()
EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "fastmta" / "examples" / "spool"

MSG = (
    "From: app@sender.example\r\nTo: {rcpt}\r\nSubject: test {i}\r\nMessage-ID: <m{i}@sender.example>\r\n\r\n"
    "body {i}\r\n"
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fastmta.toml"
    path.write_text(text)
    return path


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """*pred()* once it is truthy, else its last value after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    value = pred()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = pred()
    return value


def delivered(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["status"] == "delivered"]


def receivers(capture: Path) -> list[str]:
    """The envelope recipient of every captured message (the sink writes one file per recipient set)."""
    out = []
    for m in captured(capture):
        head = m.split(b"\r\n\r\n", 1)[0]
        out += [x.decode() for x in re.findall(rb"^X-Receiver: (.*?)\r?$", head, re.M)]
    return out


# ---------------------------------------------------------------- HTTP with curl


def curl(url: str, *args: str, token: str | None = TOKEN, data: bytes | None = None) -> tuple[int, Any]:
    """(HTTP status, parsed JSON body or text) of one curl request."""
    cmd = ["curl", "-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}", *args]
    if token is not None:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    if data is not None:
        cmd += ["--data-binary", "@-"]
    done = subprocess.run([*cmd, url], input=data, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    body, _, status = done.stdout.rpartition(b"\n")
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = body.decode("utf-8", "replace")
    return int(status), parsed


def post_json(url: str, payload: Any, token: str | None = TOKEN) -> tuple[int, Any]:
    return curl(url, "-X", "POST", "-H", "Content-Type: application/json", token=token,
                data=json.dumps(payload).encode())


def metrics(svc: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics (scraped with curl), by (name, sorted labels)."""
    status, text = curl(f"{svc.http}/metrics", token=None)
    assert status == 200, text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_http_api_with_curl(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    with capture_sink(capture) as sink:
        cfg = _write(tmp_path, serve_config(data, sink, tokens=[("backend", TOKEN_SHA)]))
        with served(cfg, data) as svc:
            api = svc.http
            # No token, a wrong one: 401, nothing taken.
            status, body = post_json(f"{api}/v1/messages", {"sender": "a@sender.example", "recipients": ["x@d.example"],
                                                             "content": MSG.format(rcpt="x@d.example", i=0)}, token=None)
            assert status == 401 and "authorization required" in body["error"], body
            status, body = curl(f"{api}/v1/messages/nothing", token="not-the-token")
            assert status == 401 and body["error"] == "unknown token", body
            # JSON, with meta.
            status, body = post_json(f"{api}/v1/messages", {
                "sender": "app@sender.example", "recipients": ["j1@dest.example", "j2@dest.example"],
                "content": MSG.format(rcpt="j1@dest.example", i=1), "meta": {"order": "42"}})
            assert status == 202 and body["recipients"] == 2, body
            json_id = body["id"]
            # message/rfc822, envelope in the query string; without Date and Message-ID: it gets them (it went
            # as it came, and Gmail refuses mail without a Message-ID).
            status, body = curl(f"{api}/v1/messages?sender=app@sender.example&recipient=r1@dest.example",
                                "-X", "POST", "-H", "Content-Type: message/rfc822",
                                data=b"From: app@sender.example\r\nTo: r1@dest.example\r\nSubject: no ids\r\n\r\nx\r\n")
            assert status == 202 and body["recipients"] == 1, body
            raw_id = body["id"]
            # A bad request names its field.
            status, body = post_json(f"{api}/v1/messages", {"sender": "app@sender.example", "recipients": [],
                                                            "content": "x"})
            assert status == 400 and body["field"] == "recipients", body
            # A campaign: three rows, one broken (a CR in a merge field): reported, the others queued.
            status, body = post_json(f"{api}/v1/campaigns", {
                "sender": "news@sender.example", "campaign": "spring",
                "template": {"from": "News <news@sender.example>", "subject": "Hi {{ name }}",
                             "text": "Hello {{ name }}.\n"},
                "recipients": [{"email": "c1@dest.example", "data": {"name": "One"}},
                               {"email": "c2@dest.example", "data": {"name": "Two\r\nBcc: x@evil.example"}},
                               {"email": "c3@dest.example", "data": {"name": "Three"}}]})
            assert status == 202, body
            assert [a["email"] for a in body["accepted"]] == ["c1@dest.example", "c3@dest.example"]
            assert [(r["email"], r["index"]) for r in body["rejected"]] == [("c2@dest.example", 1)]
            campaign_ids = [a["id"] for a in body["accepted"]]

            # GET /v1/messages/{id} until every recipient is final and delivered.
            def final(mid: str) -> dict[str, Any] | None:
                status, body = curl(f"{api}/v1/messages/{mid}")
                assert status == 200, body
                return body if body["final"] else None

            for mid, n in ((json_id, 2), (raw_id, 1), *((c, 1) for c in campaign_ids)):
                shown = wait_for(lambda mid=mid: final(mid), timeout=30)
                assert shown, f"{mid} not final: {serve_log(svc)}"
                assert [r["status"] for r in shown["recipients"]] == ["delivered"] * n, shown
            status, body = curl(f"{api}/v1/messages/0000000000000000")
            assert status == 404, body
            # Accounting lines reach the file in batches (just before the journal records of their
            # outcomes, and every 0.25 s): a message already shown final may be a moment ahead of its line.
            expected = {"j1@dest.example", "j2@dest.example", "r1@dest.example", "c1@dest.example", "c3@dest.example"}
            records = svc.wait_accounting(lambda rs: expected <= {r["recipient"] for r in delivered(rs)}, timeout=10)
        by_rcpt = {r["recipient"]: r for r in delivered(records)}
        assert set(by_rcpt) == expected
        assert by_rcpt["j1@dest.example"]["order"] == "42" and by_rcpt["j1@dest.example"]["via"] == "http"
        assert by_rcpt["c1@dest.example"]["job"] == "spring"
    got = sorted(receivers(capture))
    assert got == ["c1@dest.example", "c3@dest.example", "j1@dest.example", "j2@dest.example", "r1@dest.example"]
    bare = next(m for m in captured(capture) if b"X-Receiver: r1@dest.example" in m)
    assert re.search(rb"\r\nSubject: no ids\r\nDate: [^\r]+\r\nMessage-ID: <[0-9a-f.]+@sender\.example>\r\n\r\nx", bare), bare[:600]
    campaign_msg = next(m for m in captured(capture) if b"X-Receiver: c3@dest.example" in m)
    assert b"Subject: Hi Three" in campaign_msg and b"Hello Three." in campaign_msg


def test_a_suppression_the_operator_adds_stops_the_running_service_s_mail(tmp_path: Path) -> None:
    """`fastmta suppress --config` beside a running `fastmta serve` (no restart, no signal): the next
    message to that address is recorded suppressed and never reaches the receiver."""
    from fastmta.feedback.suppression import FOLLOW_INTERVAL

    capture, data = tmp_path / "capture", tmp_path / "data"

    def send(svc: Served, rcpt: str, i: int) -> None:
        status, body = post_json(f"{svc.http}/v1/messages", {"sender": "app@sender.example", "recipients": [rcpt],
                                                             "content": MSG.format(rcpt=rcpt, i=i)})
        assert status == 202, body

    with capture_sink(capture) as sink:
        cfg = _write(tmp_path, serve_config(data, sink, tokens=[("backend", TOKEN_SHA)]))
        with served(cfg, data) as svc:
            send(svc, "phone@dest.example", 1)
            assert svc.wait_accounting(lambda rs: len(delivered(rs)) == 1, timeout=20), serve_log(svc)
            added = subprocess.run([sys.executable, "-m", "fastmta", "suppress", "--config", str(cfg), "add",
                                    "Phone@dest.example", "--reason", "asked by phone"],
                                   capture_output=True, text=True, timeout=60)
            assert added.returncode == 0, added.stderr
            time.sleep(FOLLOW_INTERVAL + 0.5)
            send(svc, "phone@dest.example", 2)
            send(svc, "other@dest.example", 3)
            records = svc.wait_accounting(
                lambda rs: len(rs) >= 3 and any(r["recipient"] == "other@dest.example" for r in delivered(rs)),
                timeout=20)
    statuses = [(r["recipient"], r["status"]) for r in records]
    assert statuses.count(("phone@dest.example", "delivered")) == 1, statuses
    assert ("phone@dest.example", "suppressed") in statuses, statuses
    hit = next(r for r in records if r["status"] == "suppressed")
    assert "asked by phone" in hit["text"], hit
    assert sorted(receivers(capture)) == ["other@dest.example", "phone@dest.example"]


def test_smtp_mail_tagged_by_its_headers_gets_a_job_and_a_pool(tmp_path: Path) -> None:
    """[serve] meta_headers: PowerMTA's X-Job and X-Virtual-MTA for mail that comes by SMTP (swaks here): the
    campaign and the egress pool in the accounting, the headers taken out unless the client's DKIM covers them."""
    capture, data = tmp_path / "capture", tmp_path / "data"
    extra = ('[[sources]]\nname = "tx"\n\n[[sources]]\nname = "bulk"\npools = ["marketing"]\n')
    serve_extra = 'meta_headers = {"X-Job" = "job", "X-Virtual-MTA" = "pool"}'

    def swaks(rcpt: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["swaks", "--timeout", "10", "--server", f"{svc.smtp[0]}:{svc.smtp[1]}",
                               "--from", "app@sender.example", "--to", rcpt, *args],
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)

    with capture_sink(capture) as sink:
        cfg = _write(tmp_path, serve_config(data, sink, extra=extra, serve_extra=serve_extra))
        with served(cfg, data) as svc:
            sent = swaks("tagged@dest.example", "--add-header", "X-Job: spring-sale",
                         "--add-header", "X-Virtual-MTA: marketing")
            assert sent.returncode == 0, sent.stdout[-2000:]
            signed = ("DKIM-Signature: v=1; a=rsa-sha256; d=sender.example; s=s1;\r\n h=from:to:x-job; bh=x; b=y\r\n"
                      "From: app@sender.example\r\nTo: signed@dest.example\r\nX-Job: autumn\r\nSubject: s\r\n\r\nhi\r\n")
            sent = swaks("signed@dest.example", "--data", signed)
            assert sent.returncode == 0, sent.stdout[-2000:]
            sent = swaks("plain@dest.example")
            assert sent.returncode == 0, sent.stdout[-2000:]
            refused = swaks("bad@dest.example", "--add-header", "X-Virtual-MTA: " + "m" * 300)
            assert refused.returncode != 0 and "554 5.6.0" in refused.stdout and "X-Virtual-MTA" in refused.stdout
            unknown = swaks("lost@dest.example", "--add-header", "X-Virtual-MTA: marketting")
            assert unknown.returncode != 0 and "no source is in pool 'marketting'" in unknown.stdout
            records = svc.wait_accounting(lambda rs: len(delivered(rs)) == 3, timeout=20)
    by_rcpt = {r["recipient"]: r for r in delivered(records)}
    assert set(by_rcpt) == {"tagged@dest.example", "signed@dest.example", "plain@dest.example"}
    assert (by_rcpt["tagged@dest.example"]["job"], by_rcpt["tagged@dest.example"]["pool"]) == ("spring-sale", "marketing")
    assert by_rcpt["tagged@dest.example"]["source"] == "bulk"
    assert by_rcpt["signed@dest.example"]["job"] == "autumn" and by_rcpt["signed@dest.example"]["source"] == "tx"
    assert "job" not in by_rcpt["plain@dest.example"] and by_rcpt["plain@dest.example"]["source"] == "tx"
    mail = {m.split(b"X-Receiver: ", 1)[1].split(b"\r\n", 1)[0].decode(): m for m in captured(capture)}
    assert b"X-Job" not in mail["tagged@dest.example"] and b"X-Virtual-MTA" not in mail["tagged@dest.example"]
    assert b"X-Job: autumn" in mail["signed@dest.example"]  # its signature covers it: left as it was


def test_metrics_and_health_after_deliveries(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    n_smtp, n_http = 7, 5
    with capture_sink(capture) as sink:
        cfg = _write(tmp_path, serve_config(data, sink, tokens=[("backend", TOKEN_SHA)]))
        with served(cfg, data) as svc:
            assert curl(f"{svc.http}/healthz", token=None)[0] == 200
            status, body = curl(f"{svc.http}/readyz", token=None)
            assert status == 200, body
            host, port = svc.smtp

            async def inject() -> None:
                async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
                    for i in range(n_smtp):
                        rcpt = f"s{i}@dest.example"
                        errors, _ = await smtp.sendmail("app@sender.example", [rcpt], MSG.format(rcpt=rcpt, i=i))
                        assert not errors

            asyncio.run(inject())
            for i in range(n_http):
                rcpt = f"h{i}@dest.example"
                status, body = post_json(f"{svc.http}/v1/messages", {
                    "sender": "app@sender.example", "recipients": [rcpt], "content": MSG.format(rcpt=rcpt, i=100 + i)})
                assert status == 202, body
            n = n_smtp + n_http
            svc.wait_accounting(lambda rs: len(delivered(rs)) >= n)
            m = wait_for(lambda: (lambda m: m if m.get(("fastmta_outcomes_total", (("status", "delivered"),))) == n
                                  else None)(metrics(svc)), timeout=10)
            assert m, metrics(svc)
            assert m[("fastmta_injected_messages_total", (("via", "smtp"),))] == n_smtp
            assert m[("fastmta_injected_messages_total", (("via", "http"),))] == n_http
            assert m[("fastmta_injected_recipients_total", (("via", "http"),))] == n_http
            assert m[("fastmta_spool_commit_seconds_count", ())] > 0
            assert m[("fastmta_spool_commit_seconds_bucket", (("le", "+Inf"),))] == m[
                ("fastmta_spool_commit_seconds_count", ())]
            assert m[("fastmta_unfinished_recipients", ())] == 0
            assert m[("fastmta_time_in_queue_seconds_count", (("status", "delivered"),))] == n
            assert m[("process_resident_memory_bytes", ())] > 0
            assert curl(f"{svc.http}/readyz", token=None)[0] == 200
    assert len(captured(capture)) == n


# ------------------------------------------------------------------- pickup


def pickup_config(tmp_path: Path, data: Path, relay: tuple[str, int], pickup: Path, extra: str = "") -> Path:
    return _write(tmp_path, serve_config(
        data, relay, extra=extra, serve_extra=f'[serve.pickup]\ndirectory = "{pickup}"\nsettle = 0\ninterval = 0.2\n',
    ))


def drop(directory: Path, name: str, content: bytes) -> Path:
    """Write as maildrop does: a dot-file, then a rename into place (the watcher never sees half a file)."""
    tmp = directory / f".{name}.tmp"
    tmp.write_bytes(content)
    os.replace(tmp, directory / name)
    return directory / name


def pickup_file(rcpt: str, i: int, sender: str = "ops@sender.example", from_: str = "ops@sender.example") -> bytes:
    return (f"X-Sender: {sender}\r\nX-Receiver: {rcpt}\r\nFrom: {from_}\r\nTo: {rcpt}\r\nSubject: pickup {i}\r\n"
            f"Message-ID: <p{i}@sender.example>\r\n\r\npickup body {i}\r\n").encode()


def test_pickup_directory_exactly_once_and_rejects(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    pickup = tmp_path / "pickup"
    pickup.mkdir()
    n = 20
    with capture_sink(capture) as sink:
        cfg = pickup_config(tmp_path, data, sink, pickup)
        with served(cfg, data) as svc:
            files = [drop(pickup, f"m{i:02d}.eml", pickup_file(f"p{i}@dest.example", i)) for i in range(n)]
            bad = drop(pickup, "bad.eml", b"this is not a message at all\r\n\r\nbody\r\n")
            records = svc.wait_accounting(lambda rs: len(delivered(rs)) >= n)
            assert len(delivered(records)) == n, serve_log(svc)
            # Queued files are deleted; the malformed one is moved aside with why.
            assert wait_for(lambda: not any(f.exists() for f in [*files, bad]), timeout=10), list(pickup.iterdir())
            rejected = pickup / ".rejected" / "bad.eml"
            assert rejected.exists()
            reason = (pickup / ".rejected" / "bad.eml.reason").read_text()
            assert "the first line is no header field" in reason
            rejects = [json.loads(x) for x in (data / "rejects.jsonl").read_text().splitlines()]
            assert len(rejects) == 1 and rejects[0]["file"] == str(pickup / "bad.eml"), rejects
            assert "the first line is no header field" in rejects[0]["reason"]
            # The same content again (another name, later): known by content, not sent again, but never
            # deleted unsent (it was, without a word: an alert repeated word for word was lost). Kept in
            # .duplicates/ with why, and logged.
            again = drop(pickup, "again.eml", pickup_file("p3@dest.example", 3))
            fresh = drop(pickup, "fresh.eml", pickup_file("fresh@dest.example", 99))
            records = svc.wait_accounting(lambda rs: len(delivered(rs)) >= n + 1)
            assert wait_for(lambda: not again.exists() and not fresh.exists(), timeout=10)
            time.sleep(1.0)  # several scans: nothing more comes of it
            records = svc.accounting()
            assert (pickup / ".rejected" / "bad.eml").exists() and len(list((pickup / ".rejected").iterdir())) == 2
            assert sorted(p.name for p in (pickup / ".duplicates").iterdir()) == ["again.eml", "again.eml.reason"]
            assert "already queued" in (pickup / ".duplicates" / "again.eml.reason").read_text()
            assert "pickup " + str(again) + ": not sent: the same content" in serve_log(svc)
        assert sorted(r["recipient"] for r in delivered(records)) == sorted(
            [f"p{i}@dest.example" for i in range(n)] + ["fresh@dest.example"])
        assert all(r["via"] == "pickup" for r in records)
        assert len((data / "rejects.jsonl").read_text().splitlines()) == 1
    got = Counter(receivers(capture))
    assert set(got.values()) == {1} and len(got) == n + 1


def test_pickup_files_whose_names_are_not_utf8(tmp_path: Path) -> None:
    # Found by an attack on intake: a good file named b"good-\xff.eml" was deleted without ever being
    # queued (its record could not be encoded, yet its row was marked taken). Now it is sent and then
    # deleted by its real name; a malformed one is moved aside as any other, named \xNN on record.
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    pickup = tmp_path / "pickup"
    pickup.mkdir()
    good_name, bad_name = os.fsdecode(b"good-\xff.eml"), os.fsdecode(b"bad-\xfe.eml")
    with capture_sink(capture) as sink:
        cfg = pickup_config(tmp_path, data, sink, pickup)
        with served(cfg, data) as svc:
            good = drop(pickup, good_name, pickup_file("odd@dest.example", 1))
            bad = drop(pickup, bad_name, b"this is not a message at all\r\n\r\nbody\r\n")
            records = svc.wait_accounting(lambda rs: len(delivered(rs)) >= 1)
            assert [r["recipient"] for r in delivered(records)] == ["odd@dest.example"], serve_log(svc)
            assert wait_for(lambda: not good.exists() and not bad.exists(), timeout=10), list(pickup.iterdir())
            assert (pickup / ".rejected" / bad_name).exists()
            rejects = [json.loads(x) for x in (data / "rejects.jsonl").read_text().splitlines()]
            assert [Path(r["file"]).name for r in rejects] == ["bad-\\xfe.eml"], rejects
            assert "failed" not in serve_log(svc)
    assert receivers(capture) == ["odd@dest.example"]


def test_a_pickup_file_named_as_another_shows_on_record(tmp_path: Path) -> None:
    # A file really named "odd-\\xff.eml" (a backslash typed) and one whose name has the byte 0xff
    # went on record under the same name, and serve's map from names on record back to files sent
    # the typed one's delete to the other file (lost if that one's submit had failed this scan).
    # The escaped name now says it is not the typed one.
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    pickup = tmp_path / "pickup"
    pickup.mkdir()
    literal, escaped = "odd-\\xff.eml", os.fsdecode(b"odd-\xff.eml")
    with capture_sink(capture) as sink:
        cfg = pickup_config(tmp_path, data, sink, pickup)
        with served(cfg, data) as svc:
            bad = drop(pickup, escaped, b"this is not a message at all\r\n\r\nbody\r\n")
            good = drop(pickup, literal, pickup_file("typed@dest.example", 1))
            records = svc.wait_accounting(lambda rs: len(delivered(rs)) >= 1)
            assert [r["recipient"] for r in delivered(records)] == ["typed@dest.example"], serve_log(svc)
            assert wait_for(lambda: not good.exists() and not bad.exists(), timeout=10), list(pickup.iterdir())
            assert sorted(p.name for p in (pickup / ".rejected").iterdir()) == [escaped, escaped + ".reason"]
            rejects = [json.loads(x) for x in (data / "rejects.jsonl").read_text().splitlines()]
            assert [Path(r["file"]).name for r in rejects] == ["odd-\\xff.eml (not UTF-8, 1)"], rejects
    assert receivers(capture) == ["typed@dest.example"]


def make_campaign(directory: Path, n: int, campaign_id: str = "pickup-campaign") -> list[str]:
    """A campaign job (the example's template, a recipients file of *n* rows) written into *directory*."""
    staging = directory.parent / f"staging-{campaign_id}"
    staging.mkdir()
    for name in ("welcome.txt", "welcome.html", "dkim-test-ed25519.key.pem"):
        (staging / name).write_bytes((EXAMPLE / name).read_bytes())
    toml = (EXAMPLE / "welcome.toml").read_text().replace('recipients = "recipients.csv"', 'recipients = "r.csv"')
    toml = toml.replace('id = "welcome-2026-11"', f'id = "{campaign_id}"')
    rcpts = [f"user{i}@c{i % 7}.example" for i in range(n)]
    with open(staging / "r.csv", "w") as f:
        f.write("email,first_name,last_name,id,signup\n")
        for i, r in enumerate(rcpts):
            f.write(f"{r},First{i},Last,u{i},2026-01-{1 + i % 28:02d}\n")
    (staging / "welcome.toml").write_text(toml)
    # Everything the job needs is in place before the job file itself appears.
    for name in ("welcome.txt", "welcome.html", "dkim-test-ed25519.key.pem", "r.csv", "welcome.toml"):
        os.replace(staging / name, directory / name)
    staging.rmdir()
    return rcpts


def test_pickup_campaign_once_across_restart(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    pickup = tmp_path / "pickup"
    pickup.mkdir()
    n = 150
    with capture_sink(capture) as sink:
        cfg = pickup_config(tmp_path, data, sink, pickup)
        with served(cfg, data) as svc:
            rcpts = make_campaign(pickup, n)
            records = svc.wait_accounting(lambda rs: len(delivered(rs)) >= n, timeout=60)
        assert svc.proc.returncode == 0, serve_log(svc)
        assert sorted(r["recipient"] for r in delivered(records)) == sorted(rcpts)
        assert {r["job"] for r in records} == {"pickup-campaign"}
        # The job's files stay (only pickup files are deleted): a restart reads them again and sends nothing.
        assert (pickup / "welcome.toml").exists()
        with served(cfg, data) as svc2:
            time.sleep(2.0)  # ten scans
            assert svc2.proc.poll() is None
            after = svc2.accounting()
        assert len(after) == len(records), [r for r in after if r not in records]
    got = Counter(receivers(capture))
    assert sorted(got) == sorted(rcpts) and set(got.values()) == {1}
    # Signed with the job's own key, as `fastmta send` does.
    assert all(b"DKIM-Signature:" in m and b"d=news.fastmta.example" in m for m in captured(capture))


# --------------------------------------------------------------------- DKIM


def test_dkim_signs_all_mail_by_from_domain(tmp_path: Path) -> None:
    txt: dict[str, bytes] = {}
    for selector in ("s1", "s2"):  # s2: the key rotated in by a SIGHUP below
        key = ed25519.Ed25519PrivateKey.generate()
        (tmp_path / f"{selector}.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        txt[f"{selector}._domainkey.signed.example."] = b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public)

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        key = name.decode() if isinstance(name, bytes) else name
        return txt.get(key if key.endswith(".") else key + ".")

    capture = tmp_path / "capture"
    data = tmp_path / "data"
    pickup = tmp_path / "pickup"
    pickup.mkdir()
    def dkim_toml(selector: str) -> str:
        return f'[[dkim]]\ndomain = "signed.example"\nselector = "{selector}"\nkey_file = "{selector}.pem"\n'

    with capture_sink(capture) as sink:
        cfg = pickup_config(tmp_path, data, sink, pickup, extra=dkim_toml("s1"))
        with served(cfg, data) as svc:
            host, port = svc.smtp

            async def inject() -> None:
                async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
                    for rcpt, from_ in (("smtp-signed@dest.example", "App <app@signed.example>"),
                                        ("smtp-plain@dest.example", "app@other.example")):
                        msg = MSG.format(rcpt=rcpt, i=rcpt[:10]).replace("app@sender.example", from_)
                        errors, _ = await smtp.sendmail("bounce@signed.example", [rcpt], msg)
                        assert not errors

            asyncio.run(inject())
            drop(pickup, "signed.eml", pickup_file("pickup-signed@dest.example", 1, from_="ops@signed.example"))
            drop(pickup, "plain.eml", pickup_file("pickup-plain@dest.example", 2, from_="ops@other.example"))
            svc.wait_accounting(lambda rs: len(delivered(rs)) >= 4)
            # A new key by SIGHUP (key_file relative to the configuration file): mail from now on is signed with it.
            pickup_config(tmp_path, data, sink, pickup, extra=dkim_toml("s2"))
            svc.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: "configuration reloaded: dkim keys" in serve_log(svc), timeout=10), serve_log(svc)
            drop(pickup, "rotated.eml", pickup_file("rotated@dest.example", 3, from_="ops@signed.example"))
            svc.wait_accounting(lambda rs: len(delivered(rs)) >= 5)
    by_rcpt = {}
    for m in captured(capture):
        rcpt = re.search(rb"^X-Receiver: (.*?)\r$", m, re.M)
        assert rcpt is not None
        # The capture's envelope headers are the sink's, not what was signed.
        wire = core.normalize_crlf(re.sub(rb"^X-(?:Sender|Receiver): .*\r\n", b"", m, flags=re.M))
        by_rcpt[rcpt.group(1).decode()] = wire
    assert sorted(by_rcpt) == ["pickup-plain@dest.example", "pickup-signed@dest.example", "rotated@dest.example",
                               "smtp-plain@dest.example", "smtp-signed@dest.example"]
    for rcpt, selector in (("smtp-signed@dest.example", b"s1"), ("pickup-signed@dest.example", b"s1"),
                           ("rotated@dest.example", b"s2")):
        wire = by_rcpt[rcpt]
        assert len(re.findall(rb"(?im)^dkim-signature:", wire)) == 1, wire
        d = dkimpy.DKIM(wire)
        assert d.verify(dnsfunc=dnsfunc), rcpt
        assert d.domain == b"signed.example" and d.selector == selector
    for rcpt in ("smtp-plain@dest.example", "pickup-plain@dest.example"):
        assert not re.search(rb"(?im)^dkim-signature:", by_rcpt[rcpt]), by_rcpt[rcpt]


# ------------------------------------------------------------ queue control


def fastmta_queue(svc: Served, *args: str, check: bool = True) -> Any:
    """``python -m fastmta queue --socket SOCK ARGS --json`` against the running service: its JSON answer."""
    done = subprocess.run([sys.executable, "-m", "fastmta", "queue", "--socket", svc.admin_socket, *args, "--json"],
                          capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    return done


def test_queue_control_against_the_running_service(tmp_path: Path) -> None:
    data = tmp_path / "data"
    held = [f"h{i}@held.example" for i in range(3)]
    with capture_sink(tmp_path / "good") as good, \
            capture_sink(tmp_path / "never", "--fault", "rcpt:1.0:451 4.7.1 later, says the test") as deferring:
        routes = f'[routing.static]\n"held.example" = ["{deferring[0]}:{deferring[1]}"]\n"*" = ["{good[0]}:{good[1]}"]\n'
        # Long retries: deferred mail waits in the schedule until the operator acts.
        cfg = _write(tmp_path, serve_config(data, None, extra=routes + "[queue]\nretry_initial = 300\n"))
        with served(cfg, data) as svc:
            host, port = svc.smtp

            async def inject() -> list[str]:
                ids = []
                async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
                    for i, rcpt in enumerate([*held, "ok@fine.example"]):
                        _, reply = await smtp.sendmail("app@sender.example", [rcpt], MSG.format(rcpt=rcpt, i=i))
                        ids.append(reply.rsplit(" ", 1)[-1])
                return ids

            ids = asyncio.run(inject())
            records = svc.wait_accounting(
                lambda rs: sum(r["status"] == "deferred" for r in rs) >= 3 and len(delivered(rs)) == 1)
            assert sorted(r["recipient"] for r in records if r["status"] == "deferred") == held, records
            site = f"{deferring[0]}:{deferring[1]}"

            def site_row() -> dict[str, Any]:
                rows = fastmta_queue(svc, "summary")["queues"]
                return next(r for r in rows if r["kind"] == "site" and r["site"] == site)

            row = site_row()
            assert (row["scheduled"], row["ready"], row["held"]) == (3, 0, 0), row
            total = fastmta_queue(svc, "summary")["queues"][-1]
            assert total["kind"] == "total" and total["unfinished"] == 3
            # The summary counts; show and why give each recipient's last reply.
            shown = fastmta_queue(svc, "show", ids[0])
            assert shown["recipients"][0]["status"] == "deferred"
            assert shown["recipients"][0]["last_reply"]["text"] == "451 4.7.1 later, says the test"
            why = fastmta_queue(svc, "why", held[0])["recipients"]
            assert len(why) == 1 and why[0]["state"] == "scheduled" and why[0]["site"] == site
            assert why[0]["last_reply"]["code"] == 451 and "later, says the test" in why[0]["reason"], why

            # Suspended, then "retry now": the retries are held, not sent.
            out = fastmta_queue(svc, "suspend", "domain:held.example")
            assert out["suspended"] is True and out["target"] == "domain:held.example", out
            out = fastmta_queue(svc, "retry", "domain:held.example")
            assert out["retried"] == 3, out
            row = site_row()
            assert (row["scheduled"], row["held"], row["suspended"]) == (0, 3, True), row
            why = fastmta_queue(svc, "why", held[1])["recipients"][0]
            assert why["state"] == "held" and why["held_by"] == "domain:held.example", why
            time.sleep(0.5)
            assert sum(r["status"] == "deferred" for r in svc.accounting()) == 3  # nothing was tried
            # Resumed: tried again at once, deferred again (the receiver still says 451).
            out = fastmta_queue(svc, "resume", "domain:held.example")
            assert out["resumed"] is True and out["released"] == 3, out
            svc.wait_accounting(lambda rs: sum(r["status"] == "deferred" for r in rs) >= 6)
            why = fastmta_queue(svc, "why", held[2])["recipients"][0]
            assert why["attempts"] == 2 and why["last_reply"]["text"] == "451 4.7.1 later, says the test", why
            # Unknown targets are refused with exit status 1.
            done = fastmta_queue(svc, "why", "nobody@nowhere.example", check=False)
            assert done.returncode == 1 and "no queued message" in done.stderr, done.stderr
            # Bounced by the operator: one final record per recipient.
            out = fastmta_queue(svc, "bounce", "domain:held.example", "--reason", "given up by the test")
            assert out["status"] == "bounced" and out["recipients"] == 3, out
            records = svc.wait_accounting(lambda rs: sum(r["status"] == "bounced" for r in rs) >= 3)
            # An operator's bounce is a bounce: each relayed message's sender gets its notice (before a
            # fix found by an attack on serve, notices still gathering when the service stopped were lost).
            assert wait_for(lambda: receivers(tmp_path / "good").count("app@sender.example") == 3, timeout=30)
            assert fastmta_queue(svc, "summary")["queues"][-1]["unfinished"] == 0
            time.sleep(0.3)
            records = svc.accounting()
        final = [r for r in records if r["status"] != "deferred" and r.get("via") != "dsn"]  # the notices aside
        assert sorted(r["recipient"] for r in final) == sorted([*held, "ok@fine.example"]), final
        assert sum(r.get("via") == "dsn" and r["status"] == "delivered" for r in records) == 3
        bounced = [r for r in final if r["status"] == "bounced"]
        assert all(r["category"] == "admin" and "given up by the test" in r["text"] for r in bounced), bounced
        assert Counter(r["recipient"] for r in records if r["status"] == "deferred") == {h: 2 for h in held}
    assert Counter(receivers(tmp_path / "good")) == {"ok@fine.example": 1, "app@sender.example": 3}
    assert not list((tmp_path / "never").glob("*.eml"))


# ----------------------------------------------------------------- webhooks


class WebhookReceiver:
    """An aiohttp server on 127.0.0.1 in a thread of its own: keeps every event POSTed to it."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.batches = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            self.events.extend(body["events"])
            self.batches += 1
        return web.json_response({"ok": True})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> None:
        """Listen (on the port of the last start, if any: the service's configuration names it)."""
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def delivered(self) -> dict[str, str]:
        """recipient -> event_id of every 'delivered' event received."""
        with self._lock:
            return {e["recipient"]: e["event_id"] for e in self.events if e["status"] == "delivered"}


@contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    try:
        receiver.start()
        yield receiver
    finally:
        receiver.close()


def smtp_inject(svc: Served, rcpts: list[str], start: int = 0) -> list[str]:
    """Send one message per recipient over one aiosmtplib session; the queue ids."""
    host, port = svc.smtp

    async def go() -> list[str]:
        ids = []
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
            for i, rcpt in enumerate(rcpts, start):
                errors, reply = await smtp.sendmail("app@sender.example", [rcpt], MSG.format(rcpt=rcpt, i=i))
                assert not errors, errors
                ids.append(reply.rsplit(" ", 1)[-1])
        return ids

    return asyncio.run(go())


def test_webhooks_get_every_event_and_lose_none_while_down(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    first = [f"w{i}@dest.example" for i in range(15)]
    second = [f"x{i}@dest.example" for i in range(15)]
    with capture_sink(capture) as sink, webhook_receiver() as hook:
        hooks = (f'[[serve.webhooks]]\nurl = "{hook.url}"\nmax_batch_delay = 0.1\n'
                 "initial_backoff = 0.2\nmax_backoff = 1.0\nbatch_size = 10\n")
        cfg = _write(tmp_path, serve_config(data, sink, serve_extra=hooks, tokens=[("b", TOKEN_SHA)]))
        with served(cfg, data) as svc:
            smtp_inject(svc, first)
            assert wait_for(lambda: len(hook.delivered()) >= len(first), timeout=20), hook.events
            # The receiver goes away; mail goes on being delivered meanwhile.
            hook.stop()
            smtp_inject(svc, second, start=100)
            svc.wait_accounting(lambda rs: len(delivered(rs)) >= len(first) + len(second))
            m = wait_for(lambda: (lambda m: m if m.get(
                ("fastmta_events_failed_attempts_total", (("endpoint", hook.url),)), 0) >= 2 else None)(metrics(svc)),
                timeout=20)
            assert m, serve_log(svc)
            backlog = m[("fastmta_events_backlog", (("endpoint", hook.url),))]
            assert backlog >= len(second), m
            assert len(hook.delivered()) == len(first)
            # Back: everything held meanwhile arrives.
            hook.start()
            assert wait_for(lambda: len(hook.delivered()) >= len(first) + len(second), timeout=30), serve_log(svc)
            records = svc.accounting()
        assert svc.proc.returncode == 0
    events = hook.delivered()
    assert sorted(events) == sorted(first + second)
    assert len(set(events.values())) == len(events)  # one event id per record
    # Every accounting record became an event, with the record's fields.
    by_rcpt = {e["recipient"]: e for e in hook.events}
    for r in delivered(records):
        assert by_rcpt[r["recipient"]]["message_id"] == r["message_id"]
        assert by_rcpt[r["recipient"]]["via"] == "smtp"


# ------------------------------------------------------------------ signals


async def _session_loop(host: str, port: int, tag: str, stop: asyncio.Event, accepted: list[str]) -> int:
    """One SMTP session sending until *stop*; the Message-IDs answered 250 go to *accepted*. Returns the count."""
    n = 0
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as smtp:
        while not stop.is_set():
            rcpt = f"{tag}-{n}@dest.example"
            mid = f"{tag}-{n}"
            msg = MSG.format(rcpt=rcpt, i=n).replace(f"<m{n}@", f"<{mid}@")
            errors, reply = await smtp.sendmail("app@sender.example", [rcpt], msg)
            assert not errors and reply.startswith("2.0.0 Ok: queued as"), reply
            accepted.append(mid)
            n += 1
    return n


def message_ids(capture: Path) -> Counter[str]:
    out: Counter[str] = Counter()
    for m in captured(capture):
        found = re.search(rb"^Message-ID: <([^@>]*)@", m, re.M)
        assert found is not None, m[:300]
        out[found.group(1).decode()] += 1
    return out


def test_sighup_under_load_loses_nothing(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    reloads = 5
    with capture_sink(capture) as sink:
        def config(k: int) -> str:
            tokens = [(f"t{j}", hashlib.sha256(f"token-{j}".encode()).hexdigest()) for j in range(k + 1)]
            return serve_config(data, sink, tokens=tokens)

        cfg = _write(tmp_path, config(0))
        with served(cfg, data) as svc:
            host, port = svc.smtp
            accepted: list[str] = []

            async def http_loop(stop: asyncio.Event) -> int:
                """The HTTP API on one keep-alive connection, with the token every configuration keeps."""
                n = 0
                connector = aiohttp.TCPConnector(limit=1)
                async with aiohttp.ClientSession(connector=connector,
                                                 headers={"Authorization": "Bearer token-0"}) as http:
                    while not stop.is_set():
                        mid = f"h-{n}"
                        rcpt = f"{mid}@dest.example"
                        msg = MSG.format(rcpt=rcpt, i=n).replace(f"<m{n}@", f"<{mid}@")
                        async with http.post(f"{svc.http}/v1/messages", json={
                                "sender": "app@sender.example", "recipients": [rcpt], "content": msg}) as resp:
                            assert resp.status == 202, await resp.text()
                        accepted.append(mid)
                        n += 1
                return n

            async def run() -> list[int]:
                stop = asyncio.Event()
                sessions = [asyncio.ensure_future(_session_loop(host, port, f"s{j}", stop, accepted)) for j in range(4)]
                sessions.append(asyncio.ensure_future(http_loop(stop)))
                await asyncio.sleep(0.5)
                for k in range(1, reloads + 1):
                    cfg.write_text(config(k))
                    svc.proc.send_signal(signal.SIGHUP)
                    deadline = time.monotonic() + 10
                    while serve_log(svc).count("configuration reloaded: http tokens") < k:
                        assert time.monotonic() < deadline, serve_log(svc)
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.3)
                stop.set()
                return await asyncio.gather(*sessions)

            counts = asyncio.run(run())
            # Every session lasted through every reload (a dropped one would have raised) and kept sending.
            assert all(c > 5 for c in counts), counts
            n = len(accepted)
            records = svc.wait_accounting(lambda rs: len(delivered(rs)) >= n, timeout=60)
            status, _ = curl(f"{svc.http}/v1/messages/x", token="token-5")
            assert status == 404  # the last configuration's token is in force
            time.sleep(0.5)
            records = svc.accounting()
        assert svc.proc.returncode == 0
    assert len(delivered(records)) == n
    assert message_ids(capture) == Counter(accepted)


async def _session_until_refused(host: str, port: int, tag: str, accepted: list[str], refused: list[str]) -> None:
    """Send until the service stops taking mail (421, or the connection closes); 250s to *accepted*."""
    n = 0
    try:
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as smtp:
            while True:
                rcpt = f"{tag}-{n}@dest.example"
                mid = f"{tag}-{n}"
                msg = MSG.format(rcpt=rcpt, i=n).replace(f"<m{n}@", f"<{mid}@")
                try:
                    errors, reply = await smtp.sendmail("app@sender.example", [rcpt], msg)
                except aiosmtplib.SMTPException as exc:
                    refused.append(f"{mid}: {exc}")
                    return
                assert not errors and reply.startswith("2.0.0 Ok: queued as"), reply
                accepted.append(mid)
                n += 1
    except (aiosmtplib.SMTPException, OSError) as exc:  # QUIT on a connection the service closed
        refused.append(f"{tag} quit: {exc}")


def test_sigterm_drains_and_a_restart_delivers_the_rest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    accepted: list[str] = []
    refused: list[str] = []
    # A slow receiver: a backlog builds up, so the queue is not empty when SIGTERM comes.
    with capture_sink(tmp_path / "cap1", "--delay", "rcpt:0.3") as slow:
        cfg = _write(tmp_path, serve_config(data, slow))
        svc = start_serve(cfg, data)
        try:
            host, port = svc.smtp

            async def run() -> None:
                sessions = [asyncio.ensure_future(_session_until_refused(host, port, f"s{j}", accepted, refused))
                            for j in range(4)]
                await asyncio.sleep(1.5)
                svc.proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(asyncio.gather(*sessions), 30)

            asyncio.run(run())
            t0 = time.monotonic()
            svc.proc.wait(30)
            assert time.monotonic() - t0 < 30
        finally:
            stop_serve(svc, sig=signal.SIGKILL)
        assert svc.proc.returncode == 0, serve_log(svc)
        assert len(refused) == 4, refused  # each session ended by the service, not by an error of ours
    left = re.search(r"stopped; (\d+) recipient\(s\) left in the queue", serve_log(svc))
    assert left is not None, serve_log(svc)
    assert int(left.group(1)) > 0, "nothing left in the queue: the restart part tests nothing"
    first = message_ids(tmp_path / "cap1")
    assert len(accepted) > 20 and sum(first.values()) < len(accepted)
    with capture_sink(tmp_path / "cap2") as fast:
        cfg.write_text(serve_config(data, fast))
        with served(cfg, data) as svc2:
            wait_for(lambda: sum(message_ids(tmp_path / "cap1").values()) + sum(
                message_ids(tmp_path / "cap2").values()) >= len(accepted), timeout=60)
            time.sleep(0.5)
        assert svc2.proc.returncode == 0
    both = message_ids(tmp_path / "cap1") + message_ids(tmp_path / "cap2")
    assert both == Counter(accepted), (set(both) ^ set(accepted), [k for k, v in both.items() if v > 1])
    records = svc2.accounting()
    assert len(delivered(records)) == len(accepted)
    assert len({r["message_id"] for r in delivered(records)}) == len(accepted)


# ------------------------------------------------------------------- health


def test_not_ready_on_a_full_disk_refuses_mail(tmp_path: Path, small_fs: Callable[[int], Path]) -> None:
    """Below MIN_FREE_BYTES (64 MiB) free in the data directory: /readyz 503, SMTP 451 at MAIL, HTTP 503."""
    mount = small_fs(96 * 2**20)
    data = mount / "data"
    capture = tmp_path / "capture"
    pickup = tmp_path / "pickup"
    pickup.mkdir()
    with capture_sink(capture) as sink:
        cfg = _write(tmp_path, serve_config(
            data, sink, tokens=[("b", TOKEN_SHA)],
            serve_extra=f'[serve.pickup]\ndirectory = "{pickup}"\nsettle = 0\ninterval = 0.2\n'))
        with served(cfg, data) as svc:
            host, port = svc.smtp
            assert curl(f"{svc.http}/readyz", token=None)[0] == 200
            smtp_inject(svc, ["before@dest.example"])
            svc.wait_accounting(lambda rs: len(delivered(rs)) >= 1)
            # The disk fills up (another process's file, say): the service stops taking mail.
            ballast = mount / "ballast"
            with open(ballast, "wb") as f:
                for _ in range(40):
                    f.write(b"\0" * 2**20)
            status, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(
                curl(f"{svc.http}/readyz", token=None)), timeout=5) or (None, None)
            assert status == 503 and body["ready"] is False and "MiB free" in body["reason"], body
            assert curl(f"{svc.http}/healthz", token=None)[0] == 200  # alive, just not ready

            async def refused() -> tuple[int, str]:
                smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20)
                await smtp.connect()
                try:
                    with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
                        await smtp.sendmail("app@sender.example", ["full@dest.example"],
                                            MSG.format(rcpt="full@dest.example", i=1))
                    return exc.value.code, exc.value.message
                finally:
                    await smtp.quit()

            code, text = asyncio.run(refused())
            assert code == 451 and "4.3.0" in text, (code, text)
            status, body = post_json(f"{svc.http}/v1/messages", {
                "sender": "app@sender.example", "recipients": ["full@dest.example"],
                "content": MSG.format(rcpt="full@dest.example", i=2)})
            assert status == 503 and "MiB free" in body["error"], body
            # A pickup file waits in the directory (not rejected: the service cannot take it now).
            waiting = drop(pickup, "waiting.eml", pickup_file("pickup@dest.example", 7))
            time.sleep(1.0)
            assert waiting.exists() and not (pickup / ".rejected").exists()
            assert len(svc.accounting()) == 1  # nothing accepted
            m = metrics(svc)
            assert m.get(("fastmta_injected_messages_total", (("via", "http"),)), 0) == 0
            # Space again: mail is taken again.
            ballast.unlink()
            assert wait_for(lambda: curl(f"{svc.http}/readyz", token=None)[0] == 200, timeout=5)
            smtp_inject(svc, ["after@dest.example"])
            records = svc.wait_accounting(lambda rs: len(delivered(rs)) >= 3)
            assert not waiting.exists()
    assert not (data / "rejects.jsonl").exists()
    expected = ["after@dest.example", "before@dest.example", "pickup@dest.example"]
    assert sorted(r["recipient"] for r in records) == expected
    assert sorted(receivers(capture)) == expected


def test_too_small_a_disk_is_never_ready(tmp_path: Path, small_fs: Callable[[int], Path]) -> None:
    mount = small_fs(8 * 2**20)
    data = mount / "data"
    with capture_sink(tmp_path / "capture") as sink:
        cfg = _write(tmp_path, serve_config(data, sink, tokens=[("b", TOKEN_SHA)]))
        with served(cfg, data) as svc:
            status, body = curl(f"{svc.http}/readyz", token=None)
            assert status == 503 and "less than 64 MiB free" in body["reason"], body
            host, port = svc.smtp
            done = subprocess.run(["swaks", "--timeout", "10", "--server", host, "--port", str(port),
                                   "--from", "app@sender.example", "--to", "x@dest.example"],
                                  capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
            assert "<** 451 4.3.0 Error: queue unavailable, try again later" in done.stdout, done.stdout
            status, body = curl(f"{svc.http}/v1/messages?sender=app@sender.example&recipient=x@dest.example",
                                "-X", "POST", "-H", "Content-Type: message/rfc822",
                                data=MSG.format(rcpt="x@dest.example", i=0).encode())
            assert status == 503, body
            status, body = post_json(f"{svc.http}/v1/campaigns", {
                "sender": "a@sender.example", "template": {"from": "a@sender.example", "subject": "s", "text": "t"},
                "recipients": [{"email": "y@dest.example"}]})
            assert status == 503, body
            time.sleep(0.3)
            assert svc.accounting() == []
    assert not list((tmp_path / "capture").glob("*.eml")) if (tmp_path / "capture").exists() else True
