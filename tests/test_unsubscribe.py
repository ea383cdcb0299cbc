"""RFC 8058 one-click unsubscribe: tokens, headers, campaigns signed with them, and the HTTP routes (curl)."""

from __future__ import annotations

import asyncio
import base64
import email
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import dkim
import msgspec
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from fastmta.cli.sinkproc import embedded_sink
from fastmta.delivery.config import Config, parse_config
from fastmta.errors import ConfigError
from fastmta.examples import SPOOL
from fastmta.feedback.suppression import Scope, SqliteSuppressionStore
from fastmta.feedback.suppression_policy import SuppressionPolicy
from fastmta.intake.campaign import Campaign
from fastmta.intake.items import Reject, SpoolItem
from fastmta.intake.pickup import read_pickup
from fastmta.intake.reader import SpoolReader
from fastmta.message.returnpath import ReturnPath
from fastmta.message.unsubscribe import MAX_TOKEN_CHARS, Unsubscribe
from fastmta.serve.feedback_loop import FeedbackLoop
from fastmta.serve.unsubscribe import add_unsubscribe_routes

SECRET = b"0123456789abcdef-test-secret"
BASE = "https://u.fastmta.example"
DAY = 86400.0


def make(**kw: Any) -> Unsubscribe:
    return Unsubscribe(SECRET, BASE, kw.pop("mailto", "u.fastmta.example"), **kw)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


# --- tokens ---------------------------------------------------------------------------------


def test_token_round_trip() -> None:
    u = make()
    token = u.token("welcome-2026-11", "Ann@One.example")
    assert u.verify(token) == ("welcome-2026-11", "Ann@One.example")
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert u.verify(u.token("liste été", "ünïcode@bücher.example")) == ("liste été", "ünïcode@bücher.example")
    # The longest tag and recipient still make a token within the cap, and it verifies.
    longest = u.token("t" * 128, "a" * 64 + "@" + "d" * 189)
    assert len(longest) <= MAX_TOKEN_CHARS and u.verify(longest) == ("t" * 128, "a" * 64 + "@" + "d" * 189)
    for tag, rcpt in (("", "a@b.example"), ("t" * 129, "a@b.example"), ("x", ""), ("x", "a" * 255),
                      ("x", "a@b.example\r\nBcc: eve@evil.example"), ("x\n", "a@b.example"), ("x", "a\x00@b")):
        with pytest.raises(ValueError):
            u.token(tag, rcpt)


def test_tampered_forged_or_foreign_tokens_are_refused() -> None:
    u = make()
    token = u.token("news", "ann@one.example")
    raw = _raw(token)
    for i in range(len(raw)):  # any changed byte: payload or MAC
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        assert u.verify(_b64(bytes(flipped))) is None, i
    # Another recipient's payload under this MAC, a truncated MAC, garbage, and oversize input.
    other = _raw(u.token("news", "bob@one.example"))
    assert u.verify(_b64(other[:-16] + raw[-16:])) is None
    assert u.verify(token[:-4]) is None
    for junk in ("", "a", "!!!!", token + "=", token + ".", "A" * (MAX_TOKEN_CHARS + 1), "é" * 40, token[:10]):
        assert u.verify(junk) is None, junk
    # Another secret, and the return path's MAC over the same data: domain-separated keys.
    assert Unsubscribe(b"another-secret-of-16+", BASE).verify(token) is None
    rp = ReturnPath(SECRET, "bounces.fastmta.example")
    assert u.verify(rp.token("news", "ann@one.example")) is None
    with pytest.raises(ValueError):
        Unsubscribe(b"short", BASE)


def test_expiry_and_clock() -> None:
    now = [1_780_000_000.0]
    u = make(max_age_days=30, clock=lambda: now[0])
    token = u.token("news", "ann@one.example")
    now[0] += 29 * DAY
    assert u.verify(token) == ("news", "ann@one.example")
    now[0] += 2 * DAY
    assert u.verify(token) is None  # expired
    assert make(clock=lambda: now[0]).verify(token) == ("news", "ann@one.example")  # no max age: never expires
    future = make(clock=lambda: now[0] + 10 * DAY).token("news", "ann@one.example")
    assert make(clock=lambda: now[0]).verify(future) is None  # issued "in the future": not ours as it stands


def test_header_fields_folded_and_injection_proof() -> None:
    u = make()
    block = u.headers("welcome-2026-11", "ann@one.example")
    lines = block.split(b"\r\n")
    assert lines[-1] == b"" and all(len(line) <= 998 for line in lines)
    assert lines[0].startswith(b"List-Unsubscribe: <https://u.fastmta.example/u/") and lines[0].endswith(b">,")
    assert lines[1].startswith(b" <mailto:u@u.fastmta.example?subject=")  # folded between the URIs
    assert lines[2] == b"List-Unsubscribe-Post: List-Unsubscribe=One-Click"
    msg = email.message_from_bytes(block + b"\r\nbody")
    assert len(msg.get_all("List-Unsubscribe") or []) == 1 and len(msg.keys()) == 2
    uris = [x.strip().strip("<>") for x in "".join(msg["List-Unsubscribe"].split()).split(",")]
    https_token = uris[0].rsplit("/", 1)[1]
    mailto_token = uris[1].rsplit("=", 1)[1]
    assert u.verify(https_token) == u.verify(mailto_token) == ("welcome-2026-11", "ann@one.example")
    assert u.from_mail("u@u.fastmta.example", f"Re: {mailto_token}") == ("welcome-2026-11", "ann@one.example")
    assert u.from_mail(f"u-{mailto_token}@u.fastmta.example", "") == ("welcome-2026-11", "ann@one.example")
    assert u.from_mail("u@u.fastmta.example", "unsubscribe me") is None
    # Whatever the address holds, only base64url reaches the header: no CR/LF, no '>' or ',' to split the list.
    odd = 'eve"<>,;()@x.example'
    block = u.headers("news", odd)
    assert block.count(b"\r\n") == 3 and b'"' not in block and odd.encode() not in block
    assert u.verify(block.split(b"/u/")[1].split(b">")[0].decode()) == ("news", odd)
    with pytest.raises(ValueError):
        u.headers("news", "a@b.example\r\nBcc: eve@evil.example")
    one_line = Unsubscribe(SECRET, "https://u.x", None).headers("n", "a@b.c")
    assert one_line.count(b"\r\n") == 2 and b"mailto" not in one_line  # no mailto: domain: https only
    for bad in ("http://u.example", "https://u.example/a b", "https://u.example/<x>", "https://u.example/a,b",
                "https://u.example/\r\nX: y", "u.example", 'https://u.example/"'):
        with pytest.raises(ValueError):
            Unsubscribe(SECRET, bad)
    with pytest.raises(ValueError):
        Unsubscribe(SECRET, BASE, "not a domain\r\n")


# --- configuration --------------------------------------------------------------------------


def test_config_section(tmp_path: Path) -> None:
    (tmp_path / "rp.key").write_bytes(SECRET)
    (tmp_path / "u.key").write_bytes(b"another-secret-of-16+")
    rp_only = parse_config(f'[return_path]\ndomain = "b.example"\nsecret_file = "{tmp_path / "rp.key"}"\n'
                           f'[unsubscribe]\nbase_url = "{BASE}/"\nmailto_domain = "U.Fastmta.Example"\n')
    u = rp_only.unsubscribe.build(rp_only.return_path.secret_file)
    assert u is not None and u.base_url == BASE and u.mailto_domain == "u.fastmta.example"
    assert Unsubscribe(SECRET, BASE).verify(u.token("n", "a@b.example")) == ("n", "a@b.example")  # the rp secret
    own = parse_config(f'[unsubscribe]\nbase_url = "{BASE}"\nsecret_file = "{tmp_path / "u.key"}"\nmax_age_days = 90\n')
    u2 = own.unsubscribe.build()
    assert u2 is not None and u2.max_age_days == 90 and u2.mailto_domain is None
    assert Unsubscribe(b"another-secret-of-16+", BASE).verify(u2.token("n", "a@b.example")) is not None
    assert Config().unsubscribe.build() is None  # off by default
    assert parse_config(f'[unsubscribe]\nbase_url = "{BASE}"\nenabled = false\n').unsubscribe.build() is None
    for text in (f'[unsubscribe]\nbase_url = "{BASE}"\n',  # no secret anywhere
                 '[unsubscribe]\nbase_url = "http://u.example"\nsecret_file = "x"\n',
                 f'[unsubscribe]\nbase_url = "{BASE}"\nsecret_file = "x"\nmailto_domain = "a b"\n',
                 f'[unsubscribe]\nbase_url = "{BASE}"\nsecret_file = "x"\nbogus = 1\n'):
        with pytest.raises(ConfigError, match="unsubscribe"):
            parse_config(text)
    (tmp_path / "short.key").write_bytes(b"short")
    short = parse_config(f'[unsubscribe]\nbase_url = "{BASE}"\nsecret_file = "{tmp_path / "short.key"}"\n')
    with pytest.raises(ValueError):
        short.unsubscribe.build()


# --- campaigns --------------------------------------------------------------------------------


def _dns(key_path: Path) -> Callable[..., bytes]:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)  # type: ignore[union-attr]
    record = b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)
    return lambda name, timeout=5: record


def _job(spool: Path, *, own_header: bool = False, own_post: bool = False, dkim_headers: str = "") -> Path:
    spool.mkdir(exist_ok=True)
    shutil.copy(SPOOL / "dkim-test-ed25519.key.pem", spool / "key.pem")
    (spool / "recipients.csv").write_text("email,name\nann@one.example,Ann\nbob@two.example,Bob\n")
    headers = 'From = "News <news@news.fastmta.example>"\nTo = "{{ email }}"\nSubject = "Hi {{ name }}"\n'
    if own_header:
        headers += 'List-Unsubscribe = "<https://own.example/u?e={{ email | urlencode }}>"\n'
    if own_post:
        headers += 'List-Unsubscribe-Post = "List-Unsubscribe=One-Click"\n'
    job = spool / "news.toml"
    job.write_text(
        '[campaign]\nid = "news-2026-05"\nsender = "bounces@news.fastmta.example"\nrecipients = "recipients.csv"\n'
        '[[dkim]]\ndomain = "news.fastmta.example"\nselector = "test2026"\nkey_path = "key.pem"\n'
        f'algorithm = "ed25519-sha256"\n{dkim_headers}'
        f'[template]\ntext = "Hello {{{{ name }}}}"\n[template.headers]\n{headers}'
    )
    return job


def _h_tag(message: bytes) -> list[str]:
    signature = "".join(str(email.message_from_bytes(message)["DKIM-Signature"]).split())
    return next(t for t in signature.split(";") if t.startswith("h="))[2:].lower().split(":")


def _sent(items: list[SpoolItem | Reject]) -> list[SpoolItem]:
    assert all(isinstance(i, SpoolItem) for i in items), items
    return [i for i in items if isinstance(i, SpoolItem)]


@pytest.mark.parametrize("dkim_headers", ["", 'headers = ["from", "to", "subject"]\n'])
def test_campaign_headers_are_signed(tmp_path: Path, dkim_headers: str) -> None:
    campaign = Campaign.load(_job(tmp_path / "spool", dkim_headers=dkim_headers))
    u = make()
    rp = ReturnPath(SECRET, "bounces.fastmta.example")
    dnsfunc = _dns(SPOOL / "dkim-test-ed25519.key.pem")
    items = _sent(list(campaign.items(return_path=rp, unsubscribe=u)))
    assert len(items) == 2
    for item in items:
        [rcpt] = item.recipients
        msg = email.message_from_bytes(item.content)
        assert len(msg.get_all("List-Unsubscribe") or []) == 1
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        url = "".join(msg["List-Unsubscribe"].split()).split(",")[0].strip("<>")
        assert url.startswith(BASE + "/u/")
        assert u.verify(url.rsplit("/", 1)[1]) == ("news-2026-05", rcpt)  # list tag: the campaign id
        h = _h_tag(item.content)
        assert "list-unsubscribe" in h and "list-unsubscribe-post" in h
        assert dkim.verify(item.content, dnsfunc=dnsfunc)
        # ... and the signature covers them: change the URL and it fails.
        forged = item.content.replace(b"/u/", b"/u/A", 1)
        assert not dkim.verify(forged, dnsfunc=dnsfunc)
    # Without [unsubscribe] nothing is added.
    plain = _sent(list(Campaign.load(tmp_path / "spool" / "news.toml").items()))
    assert b"List-Unsubscribe" not in plain[0].content


def test_a_template_keeps_its_own_list_unsubscribe(tmp_path: Path) -> None:
    u = make()
    own = _sent(list(Campaign.load(_job(tmp_path / "a", own_header=True, own_post=True)).items(unsubscribe=u)))
    msg = email.message_from_bytes(own[0].content)
    assert msg.get_all("List-Unsubscribe") == ["<https://own.example/u?e=ann%40one.example>"]
    assert len(msg.get_all("List-Unsubscribe-Post") or []) == 1
    # Only a Post header of its own: ours adds List-Unsubscribe, and no second Post.
    post_only = _sent(list(Campaign.load(_job(tmp_path / "b", own_post=True)).items(unsubscribe=u)))
    msg = email.message_from_bytes(post_only[0].content)
    assert len(msg.get_all("List-Unsubscribe") or []) == 1 and len(msg.get_all("List-Unsubscribe-Post") or []) == 1
    assert dkim.verify(post_only[0].content, dnsfunc=_dns(SPOOL / "dkim-test-ed25519.key.pem"))


def test_reader_passes_it_through_and_an_unfit_row_is_rejected(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    _job(spool)
    with open(spool / "recipients.csv", "a") as f:
        f.write("a" * 64 + "@" + "d" * 200 + ".example,Long\n")  # over 254 octets: no token for it
    events = list(SpoolReader(spool, unsubscribe=make()))
    items = [e for e in events if isinstance(e, SpoolItem)]
    rejects = [e for e in events if isinstance(e, Reject)]
    assert len(items) == 2 and all(b"List-Unsubscribe-Post:" in i.content for i in items)
    assert len(rejects) == 1 and "recipient" in rejects[0].reason


def test_fastmta_send_adds_the_headers(tmp_path: Path, world_writable_dir: Path) -> None:
    spool = tmp_path / "spool"
    _job(spool)
    (tmp_path / "rp.key").write_bytes(SECRET)
    config = tmp_path / "fastmta.toml"
    config.write_text(f'[return_path]\ndomain = "bounces.fastmta.example"\nsecret_file = "{tmp_path / "rp.key"}"\n'
                      f'[unsubscribe]\nbase_url = "{BASE}"\n')
    with embedded_sink(["--capture", str(world_writable_dir)]) as (host, port):
        out = subprocess.run([sys.executable, "-m", "fastmta", "send", str(spool), "--relay", f"{host}:{port}",
                              "--config", str(config), "--quiet"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    u = Unsubscribe(SECRET, BASE)
    dnsfunc = _dns(SPOOL / "dkim-test-ed25519.key.pem")
    seen = set()
    for f in world_writable_dir.glob("*.eml"):
        msg = read_pickup(f)
        [rcpt] = msg.recipients
        parsed = email.message_from_bytes(msg.content)
        token = "".join(parsed["List-Unsubscribe"].split()).strip("<>").rsplit("/", 1)[1]
        assert u.verify(token) == ("news-2026-05", rcpt)
        assert dkim.verify(msg.content, dnsfunc=dnsfunc)
        seen.add(rcpt)
    assert seen == {"ann@one.example", "bob@two.example"}
    # A configured but unreadable secret stops the run before anything is sent.
    config.write_text(f'[unsubscribe]\nbase_url = "{BASE}"\nsecret_file = "{tmp_path / "missing.key"}"\n')
    out = subprocess.run([sys.executable, "-m", "fastmta", "send", str(spool), "--sink", "--config", str(config),
                          "--quiet"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unsubscribe" in out.stderr


# --- the HTTP routes, driven by curl ---------------------------------------------------------------


@asynccontextmanager
async def served(u: Unsubscribe, record: Callable[[str, str, str], Coroutine[Any, Any, None]]) -> AsyncIterator[str]:
    app = web.Application()
    add_unsubscribe_routes(app, u, record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def curl(*args: str) -> tuple[int, str]:
    """(status, body) of one curl request (run off the loop, so the server keeps answering)."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    body, _, status = out.decode().rpartition("\n")
    return int(status), body


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_one_click_post_with_curl_suppresses_the_address(tmp_path: Path, run: Callable[..., Any]) -> None:
    store = SqliteSuppressionStore(tmp_path / "suppressions.db")
    policy = SuppressionPolicy()
    u = make()
    recorded: list[tuple[str, str, str]] = []

    async def record(recipient: str, list_tag: str, how: str) -> None:
        recorded.append((recipient, list_tag, how))
        await asyncio.to_thread(policy.on_unsubscribe, store, recipient, list_tag, how)

    async def scenario() -> None:
        async with served(u, record) as base:
            ann = u.token("news-2026-05", "ann@one.example")
            # GET: a landing page with a form, and nothing recorded (link scanners prefetch GETs).
            status, page = await curl(f"{base}/u/{ann}")
            assert status == 200 and '<form method="post">' in page and 'value="One-Click"' in page
            assert "ann@one.example" in page and not recorded
            # A tampered token, a forged one and a missing body key: 400, nothing recorded.
            tampered = ann[:-3] + ("AAA" if not ann.endswith("AAA") else "BBB")
            for url, data in ((f"{base}/u/{tampered}", "List-Unsubscribe=One-Click"),
                              (f"{base}/u/{Unsubscribe(b'x' * 16, BASE).token('news-2026-05', 'bob@one.example')}",
                               "List-Unsubscribe=One-Click"),
                              (f"{base}/u/{ann}", "List-Unsubscribe=Yes"),
                              (f"{base}/u/{ann}", "")):
                status, _ = await curl("-X", "POST", "-d", data, url)
                assert status == 400, (url, data)
            status, _ = await curl(f"{base}/u/{tampered}")
            assert status == 400
            assert not recorded and store.check("ann@one.example", list_tag="news-2026-05") is None
            # What Gmail does: a form-encoded POST.
            status, body = await curl("-X", "POST", "-d", "List-Unsubscribe=One-Click", f"{base}/u/{ann}")
            assert (status, body.strip()) == (200, "Unsubscribed.")
            # multipart/form-data too.
            bob = u.token("news-2026-05", "bob@two.example")
            status, _ = await curl("-F", "List-Unsubscribe=One-Click", f"{base}/u/{bob}")
            assert status == 200
            # A body over the limit is refused unread.
            status, _ = await curl("-X", "POST", "--data-binary", "List-Unsubscribe=One-Click&x=" + "y" * 20000,
                                   f"{base}/u/{bob}")
            assert status == 413

    run(scenario())
    assert recorded == [("ann@one.example", "news-2026-05", "one-click"), ("bob@two.example", "news-2026-05", "one-click")]
    hit = store.check("ann@one.example", list_tag="news-2026-05")
    assert hit is not None and hit.scope is Scope.LIST and hit.source == "unsubscribe"
    assert store.check("ann@one.example", list_tag="other-list") is None  # that list only
    assert store.check("bob@two.example", list_tag="news-2026-05") is not None
    store.close()


def test_the_services_recorder_group_commits(tmp_path: Path, run: Callable[..., Any]) -> None:
    """What fastmta serve plugs in: the feedback loop's writer (one transaction for concurrent POSTs)."""
    u = make()
    events: list[dict[str, Any]] = []

    async def scenario() -> FeedbackLoop:
        loop_ = FeedbackLoop(tmp_path, emit=events.append)
        await loop_.start()
        async with served(u, loop_.record_unsubscribe) as base:
            tokens = [u.token("news", f"user{i}@x.example") for i in range(40)]
            results = await asyncio.gather(*(curl("-d", "List-Unsubscribe=One-Click", f"{base}/u/{t}") for t in tokens))
            assert [s for s, _ in results] == [200] * 40
        await loop_.close()
        return loop_

    loop_ = run(scenario())
    assert 1 <= loop_.commits < 40  # concurrent POSTs shared commits
    assert sorted(e["recipient"] for e in events if e["status"] == "unsubscribe") == sorted(
        f"user{i}@x.example" for i in range(40))
    # Durable: another connection (a fresh store) sees them all.
    again = SqliteSuppressionStore(tmp_path / "suppression.db")
    assert all(again.check(f"user{i}@x.example", list_tag="news") is not None for i in range(40))
    assert again.check("user1@x.example", list_tag="other") is None
    again.close()


def test_a_failed_record_is_503_and_retryable(tmp_path: Path, run: Callable[..., Any]) -> None:
    u = make()

    async def failing(recipient: str, list_tag: str, how: str) -> None:
        raise OSError("disk full")

    async def scenario() -> None:
        async with served(u, failing) as base:
            status, _ = await curl("-d", "List-Unsubscribe=One-Click", f"{base}/u/{u.token('n', 'a@b.example')}")
            assert status == 503

    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    run(scenario())


def test_config_struct_is_frozen_msgspec() -> None:
    cfg = msgspec.convert({"unsubscribe": {"base_url": BASE, "secret_file": "x"}}, Config)
    assert cfg.unsubscribe.active and not Config().unsubscribe.active
