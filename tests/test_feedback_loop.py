"""What comes back, through `fastmta serve`'s inbound listener: complaints, bounces, auto-replies, unsubscribes.

Reports go in over SMTP (aiosmtplib, swaks) to the bounce and FBL domains the
service receives for; what it records is read from DATA_DIR/accounting.jsonl
and, for suppressions, with `fastmta suppress list` on DATA_DIR/suppression.db.
Only reports that map to one of our signed return paths or trace headers may
suppress an address; the others are recorded, never acted on.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest

from fastmta.message.returnpath import ReturnPath
from serveproc import capture_sink, captured, raw_smtp_message, serve_config, served

pytestmark = pytest.mark.interop

CORPUS = Path(__file__).parent / "data" / "corpora" / "arf"
SECRET = b"0123456789abcdef0123456789abcdef"
BOUNCE_DOMAIN = "bounces.sender.example"


def _config(tmp_path: Path, data: Path, relay: tuple[str, int] | None) -> Path:
    secret = tmp_path / "rp.secret"
    secret.write_bytes(SECRET)
    extra = f'[return_path]\ndomain = "{BOUNCE_DOMAIN}"\nsecret_file = "{secret}"\n'
    cfg = tmp_path / "fastmta.toml"
    cfg.write_text(serve_config(data, relay, extra=extra, serve_extra='receive_domains = ["fbl.sender.example"]'))
    return cfg


def _suppressed(data: Path) -> list[dict[str, str]]:
    r = subprocess.run([sys.executable, "-m", "fastmta", "suppress", "--db", str(data / "suppression.db"), "list",
                        "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def _with_trace(raw: bytes, token: str) -> bytes:
    """The report, as one about *our* message: its returned copy carries our trace header, as ours all do."""
    m = re.search(rb"(?i)content-type:\s*(?:message/rfc822|text/rfc822-headers)[^\n]*\n(?:[ \t][^\n]*\n|[A-Za-z-]+:[^\n]*\n)*\r?\n", raw)
    assert m is not None
    return raw[: m.end()] + f"X-Fastmta-Ref: {token}\r\n".encode() + raw[m.end():]


async def _deliver(host: str, port: int, sender: str, rcpt: str, raw: bytes) -> str:
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
        _, reply = await smtp.sendmail(sender, [rcpt], raw)
        return reply


def test_corpus_complaints_over_smtp_are_recorded_and_ours_suppressed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rp = ReturnPath(SECRET, BOUNCE_DOMAIN)
    labels = [json.loads(x) for x in (CORPUS / "labels.jsonl").read_text().splitlines() if x.strip()]
    ours: dict[str, str] = {}  # recipient -> sender domain of the report
    sent = 0
    with served(_config(tmp_path, data, None), data) as svc:
        host, port = svc.smtp
        for i, label in enumerate(labels):
            raw = (CORPUS / label["file"]).read_bytes()
            rcpts = label["expected_recipients"]
            # Every other report with a recipient is about our mail (trace header); the rest are not.
            if rcpts and i % 2 == 0 and b"rfc822" in raw.lower():
                raw = _with_trace(raw, rp.token("spring2026", rcpts[0]))
                ours[rcpts[0].lower()] = ""
            asyncio.run(_deliver(host, port, "", "fbl@fbl.sender.example", raw))
            sent += 1
        records = svc.wait_accounting(
            lambda rs: len({r["inbound_id"] for r in rs if "inbound_id" in r}) >= sent, timeout=30)
    complaints = [r for r in records if r["status"] == "complaint"]
    assert len({r["inbound_id"] for r in complaints}) == sent  # every report recorded
    verified = {r["recipient"] for r in complaints if r.get("verified")}
    assert verified == set(ours)
    assert all(r["campaign"] == "spring2026" for r in complaints if r.get("verified"))
    suppressed = {s["address"].lower(): s for s in _suppressed(data)}
    rows = _suppressed(data)
    for rcpt in ours:
        # "not spam", and authentication-failure (RFC 6591) or virus reports, are no wish of the recipient's.
        wishes = [r for r in complaints if r["recipient"] == rcpt and r.get("verified")
                  and r.get("feedback_type") not in ("not-spam", "auth-failure", "virus")]
        # For the sender domain a report names; for every sender when it names none (no From quoted).
        scopes = {s["scope"] for s in rows if s["address"].lower() == rcpt}
        assert scopes == {"domain" if r.get("sender_domain") else "global" for r in wishes}, (rcpt, wishes)
    # A report nobody can tie to our mail suppresses nobody.
    assert set(suppressed) <= set(ours)
    assert not list((data / "inbound").glob("*.eml"))  # all read


def _dsn(rcpt: str, status: str, action: str, diag: str) -> bytes:
    return (
        "From: MAILER-DAEMON@mx.dest.example\r\nTo: x\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you...\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.dest.example\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diag}\r\n\r\n--B--\r\n"
    ).encode()


def test_out_of_band_bounces_auto_replies_and_forgeries(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rp = ReturnPath(SECRET, BOUNCE_DOMAIN)
    cases = [
        # (envelope recipient, message, who must end up suppressed)
        (rp.address("c1", "gone@dest.example"),
         _dsn("gone@dest.example", "5.1.1", "failed", "550 5.1.1 <gone@dest.example>: user unknown"), True),
        (rp.address("c1", "later@dest.example"),
         _dsn("later@dest.example", "4.2.2", "delayed", "452 4.2.2 mailbox full"), False),
        (rp.address("c1", "blocked@dest.example"),
         _dsn("blocked@dest.example", "5.7.1", "failed", "550 5.7.1 Service unavailable; client host blocked using Spamhaus"),
         False),
        # A forged bounce: the return path's MAC is for another recipient.
        (rp.address("c1", "someone-else@dest.example"),
         _dsn("victim@dest.example", "5.1.1", "failed", "550 5.1.1 user unknown"), False),
        (rp.address("c1", "away@dest.example"),
         b"From: away@dest.example\r\nSubject: Out of office\r\nAuto-Submitted: auto-replied\r\n\r\nBack Monday.\r\n",
         False),
    ]
    with served(_config(tmp_path, data, None), data) as svc:
        host, port = svc.smtp
        for to, raw, _ in cases:
            reply = asyncio.run(_deliver(host, port, "", to, raw))
            assert "queued as" in reply
        # Not a receive domain, not a relay client? 127.0.0.1 is trusted by default; the bounce domain is
        # received, never relayed: nothing reached the engine's queue for it.
        records = svc.wait_accounting(lambda rs: len([r for r in rs if "inbound_id" in r]) >= len(cases), timeout=30)
    by_rcpt = {r["recipient"]: r for r in records if "inbound_id" in r}
    assert by_rcpt["gone@dest.example"]["status"] == "oob_bounce"
    assert by_rcpt["gone@dest.example"]["bounce_type"] == "hard" and by_rcpt["gone@dest.example"]["verified"]
    assert by_rcpt["later@dest.example"]["status"] == "oob_delay"
    assert by_rcpt["blocked@dest.example"]["status"] == "oob_bounce"
    assert by_rcpt["victim@dest.example"].get("verified") is not True
    assert by_rcpt["away@dest.example"]["status"] == "auto_reply"
    assert not any(r["status"] in ("delivered", "deferred", "bounced") for r in records)  # nothing relayed
    assert {s["address"] for s in _suppressed(data)} == {"gone@dest.example"}


def test_a_suppressed_recipient_is_never_sent_on_any_path(tmp_path: Path) -> None:
    """Hard in-band bounce -> suppressed; then SMTP, HTTP and pickup injections to it are recorded, not sent."""
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    with capture_sink(capture, "--unknown-recipient", "gone*") as sink:
        cfg = _config(tmp_path, data, sink)
        pickup = tmp_path / "pickup"
        cfg.write_text(cfg.read_text() + f'\n[serve.pickup]\ndirectory = "{pickup}"\nsettle = 0\ninterval = 0.2\n')
        with served(cfg, data) as svc:
            host, port = svc.smtp
            msg = b"From: app@sender.example\r\nTo: gone@dest.example\r\nSubject: one\r\n\r\nhi\r\n"
            asyncio.run(_deliver(host, port, "app@sender.example", "gone@dest.example", msg))
            svc.wait_accounting(lambda rs: any(r["status"] == "bounced" for r in rs))
            deadline_records = svc.wait_accounting(lambda rs: False, timeout=1.0)  # the policy's write lands
            assert any(r["status"] == "bounced" for r in deadline_records)
            # Now on every path: SMTP, and a pickup file.
            asyncio.run(_deliver(host, port, "app@sender.example", "gone@dest.example", msg.replace(b"one", b"two")))
            pickup.mkdir(exist_ok=True)
            (pickup / ".p.tmp").write_bytes(
                b"X-Sender: app@sender.example\r\nX-Receiver: gone@dest.example\r\n" + msg.replace(b"one", b"three"))
            (pickup / ".p.tmp").rename(pickup / "p.eml")
            records = svc.wait_accounting(lambda rs: sum(r["status"] == "suppressed" for r in rs) >= 2, timeout=30)
    suppressed = [r for r in records if r["status"] == "suppressed"]
    assert len(suppressed) == 2 and {r["via"] for r in suppressed} == {"smtp", "pickup"}
    assert all(r["bounce_reason"] == "global hard_bounce" and "hard bounce" in r["text"] for r in suppressed)
    # The sink never took a message for it (the first attempt was refused, the later ones never went);
    # what it did take is the delivery status notice to the sender of the first.
    kept = captured(capture)
    assert not any(b"X-Receiver: gone@dest.example" in m for m in kept)
    assert all(b"X-Receiver: app@sender.example" in m and b"report-type=delivery-status" in m for m in kept)


class _Receiver:
    """aiosmtpd, in a thread of its own: the relaying client's mail server, receiving the notices."""

    def __init__(self) -> None:
        import threading

        from aiosmtpd.smtp import SMTP, Envelope, Session

        self.messages: list[tuple[str, list[str], bytes]] = []
        outer = self

        class Handler:
            async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
                assert isinstance(envelope.content, bytes)
                outer.messages.append((str(envelope.mail_from), list(envelope.rcpt_tos), envelope.content))
                return "250 2.0.0 OK"

        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def start() -> None:
            self.server = await self.loop.create_server(lambda: SMTP(Handler(), loop=self.loop), "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop)
        assert ready.wait(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _relay_config(tmp_path: Path, data: Path, receiver: _Receiver, sink: tuple[str, int], serve_extra: str = "") -> Path:
    """A service relaying sender.example's mail (its notices) to *receiver*, and the rest to *sink*."""
    routes = f'[routing.static]\n"sender.example" = ["127.0.0.1:{receiver.port}"]\n"*" = ["{sink[0]}:{sink[1]}"]\n'
    cfg = tmp_path / "fastmta.toml"
    cfg.write_text(serve_config(data, None, extra=routes, serve_extra=serve_extra))
    return cfg


def test_relayed_mail_that_bounces_gets_a_dsn_to_its_sender(tmp_path: Path) -> None:
    import time

    from fastmta.feedback.dsn import parse_dsn

    data = tmp_path / "data"
    receiver = _Receiver()
    try:
        with capture_sink(tmp_path / "capture", "--unknown-recipient", "gone*") as sink:
            # Tagged with a job (X-Job): its sender still gets its notice (it got none: the tag was taken
            # for a campaign of ours, whose bounces come back to the loop; found in an operator's first hour).
            cfg = _relay_config(tmp_path, data, receiver, sink, serve_extra='meta_headers = {"X-Job" = "job"}')
            with served(cfg, data) as svc:
                host, port = svc.smtp
                msg = (b"From: app@sender.example\r\nTo: x\r\nSubject: order 7\r\nMessage-ID: <o7@sender.example>\r\n"
                       b"X-Job: nl-8\r\n\r\nhi\r\n")

                async def go() -> None:
                    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
                        await smtp.sendmail("app@sender.example",
                                            ["gone1@dest.example", "gone2@dest.example", "ok@dest.example"], msg)
                        # The null sender never gets a notice (a bounce of a bounce would loop).
                        await smtp.sendmail("", ["gone3@dest.example"], msg)

                asyncio.run(go())
                deadline = time.monotonic() + 30
                while not receiver.messages and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(2.0)  # a second notice, if one were (wrongly) sent, has time to arrive
        assert len(receiver.messages) == 1, receiver.messages
        mail_from, rcpts, notice = receiver.messages[0]
        assert mail_from in ("", "<>") and rcpts == ["app@sender.example"]  # aiosmtpd shows the null sender as <>
        assert b"report-type=delivery-status" in notice and b"Auto-Submitted: auto-replied" in notice
        assert b"Message-ID: <o7@sender.example>" in notice  # the original's headers come back
        records = parse_dsn(notice)
        assert sorted((r.recipient, r.action, r.status) for r in records) == [
            ("gone1@dest.example", "failed", "5.1.1"), ("gone2@dest.example", "failed", "5.1.1")]
    finally:
        receiver.close()


def test_one_click_and_mailto_unsubscribe_through_the_service(tmp_path: Path) -> None:
    import time
    import urllib.parse

    capture = tmp_path / "capture"
    data, pickup = tmp_path / "data", tmp_path / "pickup"
    pickup.mkdir()
    rows = ["ann@dest.example", "bob@dest.example", "cid@dest.example"]
    with capture_sink(capture) as sink:
        cfg = _config(tmp_path, data, sink)
        cfg.write_text(
            '[unsubscribe]\nbase_url = "https://u.sender.example"\nmailto_domain = "u.sender.example"\n'
            + cfg.read_text() + f'\n[serve.pickup]\ndirectory = "{pickup}"\nsettle = 0\ninterval = 0.2\n'
        )

        def campaign(cid: str) -> None:
            (pickup / f"{cid}.csv").write_text("email\n" + "".join(f"{r}\n" for r in rows))
            (pickup / f".{cid}.tmp").write_text(
                f'[campaign]\nid = "{cid}"\nsender = "news@sender.example"\nrecipients = "{cid}.csv"\n'
                '[template]\ntext = "hi"\n[template.headers]\nFrom = "news@sender.example"\nTo = "<{{ email }}>"\n'
                'Subject = "weekly"\n')
            (pickup / f".{cid}.tmp").rename(pickup / f"{cid}.toml")

        with served(cfg, data) as svc:
            campaign("weekly")
            svc.wait_accounting(lambda rs: sum(r["status"] == "delivered" for r in rs) >= 3)
            links = {}
            for m in captured(capture):
                rcpt = re.search(rb"X-Receiver: (\S+)", m).group(1).decode()
                header = re.search(rb"List-Unsubscribe: <(https://[^>]+)>,\s*<mailto:([^>]+)>", m)
                assert header is not None and b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in m
                links[rcpt] = (header.group(1).decode(), header.group(2).decode())
            port_base = svc.http
            # Ann: one-click, as Gmail does it.
            path = urllib.parse.urlsplit(links["ann@dest.example"][0]).path
            r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                                "-d", "List-Unsubscribe=One-Click", port_base + path], capture_output=True, text=True,
                               timeout=30)
            assert r.stdout == "200"
            # A tampered token: refused, nothing recorded.
            bad = path[:-3] + ("AAA" if not path.endswith("AAA") else "BBB")
            r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                                "-d", "List-Unsubscribe=One-Click", port_base + bad], capture_output=True, text=True,
                               timeout=30)
            assert r.stdout.startswith("4")
            # A GET (a link scanner) unsubscribes nobody.
            r = subprocess.run(["curl", "-s", port_base + urllib.parse.urlsplit(links["cid@dest.example"][0]).path],
                               capture_output=True, text=True, timeout=30)
            assert "<form" in r.stdout
            # Bob: the mailto: link, by mail (swaks, as a mail client would send it).
            to, _, query = links["bob@dest.example"][1].partition("?")
            subject = urllib.parse.parse_qs(query)["subject"][0]
            host, port = svc.smtp
            s = subprocess.run(["swaks", "--server", host, "--port", str(port), "--from", "bob@dest.example",
                                "--to", to, "--header", f"Subject: {subject}"], capture_output=True, text=True,
                               timeout=30)
            assert s.returncode == 0, s.stdout
            svc.wait_accounting(lambda rs: sum(r["status"] == "unsubscribe" for r in rs) >= 2)
            suppressed = {x["address"]: x for x in _suppressed(data)}
            assert set(suppressed) == {"ann@dest.example", "bob@dest.example"}
            assert all(x["scope"] == "list" and x["value"] == "weekly" for x in suppressed.values())
            # The next mailing of that list skips them; Cid still gets it.
            before = len(captured(capture))
            (pickup / "weekly.toml").unlink(missing_ok=True)
            rows.append("dan@dest.example")  # a new row: the job is read again
            campaign("weekly")
            svc.wait_accounting(lambda rs: any(r["recipient"] == "dan@dest.example" and r["status"] == "delivered"
                                               for r in rs))
            time.sleep(0.5)
        new = captured(capture)[before:]
        assert sorted(re.search(rb"X-Receiver: (\S+)", m).group(1).decode() for m in new) == ["dan@dest.example"]
    # The recipient history (what the false-hard-bounce detector reads): every delivery counted.
    import sqlite3

    db = sqlite3.connect(str(data / "suppression.db"))
    history = dict(db.execute("SELECT address, delivered FROM recipient WHERE last_delivered IS NOT NULL"))
    db.close()
    assert history == {"ann@dest.example": 1, "bob@dest.example": 1, "cid@dest.example": 1, "dan@dest.example": 1}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_a_notice_still_gathering_when_the_service_stops_is_sent_once(tmp_path: Path, sig: signal.Signals) -> None:
    # Found by attacks on serve: notices wait a second to gather a message's bounces. SIGTERM in that
    # second lost them (10 of 10), even after a restart: they are now queued before the queue closes.
    # kill -9 in that second lost them too, the bounces being on disk (never tried again): what a
    # notice will say is now stored before the bounces are journaled, and queued at the next start.
    import time

    from serveproc import start_serve, stop_serve

    data = tmp_path / "data"
    receiver = _Receiver()
    try:
        with capture_sink(tmp_path / "capture", "--unknown-recipient", "gone*") as sink:
            cfg = _relay_config(tmp_path, data, receiver, sink)
            svc = start_serve(cfg, data)
            try:
                host, port = svc.smtp
                msg = b"From: app@sender.example\r\nTo: x\r\nSubject: order 8\r\n\r\nhi\r\n"

                async def go() -> None:
                    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
                        await smtp.sendmail("app@sender.example", [f"gone{i}@dest.example" for i in range(3)], msg)

                asyncio.run(go())
                # Accounting lines are flushed just before the journal batch that holds the bounces.
                svc.wait_accounting(lambda rs: sum(r["status"] == "bounced" for r in rs) >= 3)
                if sig == signal.SIGKILL:
                    time.sleep(0.3)  # that batch is on disk; the notice is still gathering (1 s)
            finally:
                code = stop_serve(svc, sig=sig)  # within the notice's second of gathering
            assert code == 0 or sig == signal.SIGKILL
            if sig == signal.SIGKILL:
                assert not receiver.messages
            with served(cfg, data):
                deadline = time.monotonic() + 20
                while not receiver.messages and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(1.5)  # a second notice, if one were (wrongly) sent, has time to arrive
        assert len(receiver.messages) == 1, receiver.messages
        notice = receiver.messages[0][2]
        assert b"report-type=delivery-status" in notice
        assert notice.count(b"Final-Recipient: rfc822; gone") == 3
    finally:
        receiver.close()


def test_a_message_refused_leaves_nothing_for_the_receive_domains(tmp_path: Path) -> None:
    # Found by an attack on serve: a message to an FBL address and to a recipient elsewhere that the
    # queue then refused was told "refused", yet its copy for the FBL address had been kept and read
    # (and on a retry after a 451, read twice). The relayed part goes first now.
    data = tmp_path / "data"
    with served(_config(tmp_path, data, None), data) as svc:
        host, port = svc.smtp

        envelope = (b"EHLO c.example\r\nMAIL FROM:<a@sender.example>\r\nRCPT TO:<fbl@fbl.sender.example>\r\n"
                    b"RCPT TO:<ok@dest.example>\r\nDATA\r\n")
        refused = asyncio.run(raw_smtp_message(host, port, envelope, b"Subject: a\x00b\r\n\r\nreport\r\n"))  # a NUL
        assert refused.startswith(b"554 5.6.0")
        asyncio.run(_deliver(host, port, "", "fbl@fbl.sender.example", b"Subject: later\r\n\r\nx\r\n"))
        records = svc.wait_accounting(lambda rs: any("inbound_id" in r for r in rs))
    assert [r.get("diagnostic") for r in records if "inbound_id" in r] == ["later"]  # only the one accepted
    assert len(list((data / "inbound").rglob("*.eml"))) == 1


def test_a_message_whose_receive_domain_part_cannot_be_written_is_not_queued(tmp_path: Path) -> None:
    # Found by an attack on serve: the relayed part was queued, then the write for the receive domains
    # failed and the client got 451 for a message already queued; every retry delivered another copy
    # (3 retries, 3 copies). The part for the receive domains is staged first now, put in place after.
    data, capture = tmp_path / "data", tmp_path / "capture"
    envelope = (b"EHLO c.example\r\nMAIL FROM:<a@sender.example>\r\nRCPT TO:<fbl@fbl.sender.example>\r\n"
                b"RCPT TO:<ok@dest.example>\r\nDATA\r\n")
    with capture_sink(capture) as sink, served(_config(tmp_path, data, sink), data) as svc:
        host, port = svc.smtp
        inbound = data / "inbound"
        inbound.rename(data / "inbound.away")
        inbound.write_bytes(b"")  # a file where the directory was: every write in it fails (root or not)
        for _ in range(3):  # the client retries, as any MTA would
            reply = asyncio.run(raw_smtp_message(host, port, envelope, b"Subject: both\r\n\r\nx\r\n"))
            assert reply.startswith(b"451 "), reply
        inbound.unlink()
        (data / "inbound.away").rename(inbound)
        reply = asyncio.run(raw_smtp_message(host, port, envelope, b"Subject: both\r\n\r\nx\r\n"))
        assert reply.startswith(b"250 "), reply
        records = svc.wait_accounting(lambda rs: any(r["status"] == "delivered" for r in rs)
                                      and any("inbound_id" in r for r in rs))
    assert [r["recipient"] for r in records if r["status"] == "delivered"] == ["ok@dest.example"]
    assert len(captured(capture)) == 1
    assert [p.name.endswith(".eml") for p in inbound.rglob("*") if p.is_file()] == [True]  # nothing staged left


def test_mail_staged_before_a_stop_is_read_at_the_start(tmp_path: Path) -> None:
    # Killed between the two steps (its relayed part queued or not, the client answered or not): the
    # staged part is read at the next start, never lost (a client that retries makes it count twice).
    data = tmp_path / "data"
    (data / "inbound").mkdir(parents=True)
    staged = data / "inbound" / "m1.eml.staged"
    staged.write_bytes(b"X-Fastmta-Envelope-From: <>\r\nX-Fastmta-Envelope-To: <fbl@fbl.sender.example>\r\n"
                       b"From: someone@else.example\r\nSubject: staged\r\n\r\nnot a report\r\n")
    (data / "inbound" / ".m2.eml.tmp").write_bytes(b"half a mess")  # a write cut short: never acknowledged
    with served(_config(tmp_path, data, None), data) as svc:
        records = svc.wait_accounting(lambda rs: any("inbound_id" in r for r in rs))
    assert [r.get("diagnostic") for r in records if "inbound_id" in r] == ["staged"]
    assert sorted(p.name for p in (data / "inbound").rglob("*") if p.is_file()) == ["m1.eml"]
