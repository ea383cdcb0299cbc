"""Fetching MTA-STS policies from HTTPS servers that answer in awkward but real ways.

A scripted HTTPS server on loopback (asyncio, TLS, one behaviour per domain, its certificate chosen
by SNI) and the suite's zone server; :class:`PolicyCache` fetches through the engine's resolver.
Each case was found by an attack on the first version (body read in one call, the trust store
replaced by ``tls_ca_file``, fetches queued into their own timeout, an AAAA failure fatal).
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from dnsserver import DNSServer
from fastmta.delivery.config import DnsConfig, MtaStsConfig
from fastmta.delivery.dns import DnsResolver
from fastmta.delivery.mta_sts import Policy, PolicyCache, PolicyError, parse_policy, parse_record
from fastmta.smtp.tlscert import make_self_signed, server_context

GOOD = b"version: STSv1\nmode: enforce\nmx: mx.example.test\nmax_age: 86400\n"
Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def head(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % len(body))


async def whole(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(head(GOOD) + GOOD)


def fetch_all(behaviours: dict[str, Behaviour], tmp: Path, *, timeout: float = 3.0,
              ca_file: Path | None = None, servfail_aaaa: bool = False) -> list[Policy | None]:
    """The policy of each domain of *behaviours*, all asked at once."""
    certs = {f"mta-sts.{d}": make_self_signed(f"mta-sts.{d}") for d in behaviours}
    bundle = tmp / "trusted.pem"
    bundle.write_bytes(b"".join(c.cert_pem for c in certs.values()))
    contexts = {n: server_context(c.cert_pem, c.key_pem) for n, c in certs.items()}
    base = next(iter(contexts.values()))
    base.sni_callback = lambda sock, name, _ctx: setattr(sock, "context", contexts.get(name or "", base))  # type: ignore[assignment,misc]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            host = next(line for line in request.split(b"\r\n") if line.lower().startswith(b"host:"))
            domain = host.split(b":")[1].strip().decode().removeprefix("mta-sts.")
            await behaviours[domain](reader, writer)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    async def main(ns: DNSServer) -> list[Policy | None]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=base)
        port = server.sockets[0].getsockname()[1]
        resolver = DnsResolver(DnsConfig(nameservers=[ns.nameserver], timeout=2))
        cache = PolicyCache(MtaStsConfig(https_port=port, timeout=timeout), resolver,
                            ca_file=str(ca_file or bundle))
        try:
            return list(await asyncio.gather(*(cache.policy(d) for d in behaviours)))
        finally:
            await cache.aclose()
            await resolver.aclose()
            server.close()

    zone = 'mta-sts A 127.0.0.1\n_mta-sts TXT "v=STSv1; id=1"'
    with DNSServer({d: zone for d in behaviours}) as ns:
        if servfail_aaaa:
            for d in behaviours:
                ns.servfail(f"mta-sts.{d}", "AAAA")
        return asyncio.run(main(ns))


def test_a_body_sent_in_pieces_is_read_whole(tmp_path: Path) -> None:
    # The first version read what aiohttp had buffered: a chunked policy came out as
    # "version: STSv1\nmode: enforce\nm" (refused: the domain mailed as without a policy), and a
    # Content-Length one cut at "max_age: 8" (accepted: the policy lapsed in 8 s).
    async def chunked(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (GOOD[:30], GOOD[30:]):
            w.write(b"%x\r\n%s\r\n" % (len(part), part))
            await w.drain()
            await asyncio.sleep(0.1)
        w.write(b"0\r\n\r\n")

    async def two_writes(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        cut = GOOD.index(b"86400") + 1
        w.write(head(GOOD) + GOOD[:cut])
        await w.drain()
        await asyncio.sleep(0.1)
        w.write(GOOD[cut:])

    got = fetch_all({"chunked.test": chunked, "pieces.test": two_writes}, tmp_path)
    assert [(p.mode, p.max_age) if p else None for p in got] == [("enforce", 86400)] * 2


def test_a_body_cut_short_or_too_long_is_no_policy(tmp_path: Path) -> None:
    async def cut_short(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(head(GOOD + b"mx: second.example.test\n") + GOOD)  # promises more than it sends
        await w.drain()
        await asyncio.sleep(0.1)
        w.transport.abort()

    async def too_long(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        body = GOOD + b"x: " + b"y" * 70_000 + b"\n"
        w.write(head(body))
        for i in range(0, len(body), 8192):  # in writes smaller than the limit
            w.write(body[i : i + 8192])
            await w.drain()

    assert fetch_all({"short.test": cut_short, "long.test": too_long}, tmp_path) == [None, None]


def test_a_burst_of_new_domains_gets_every_policy(tmp_path: Path) -> None:
    # A restart with mail for 200 new domains: their fetches queued for a connection inside their own
    # 2 s timeout, and ~120 were mailed as without a policy. They now wait for a turn before the clock.
    async def slowish(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)
        w.write(head(GOOD) + GOOD)

    got = fetch_all({f"d{i}.test": slowish for i in range(200)}, tmp_path, timeout=2.0)
    assert collections.Counter(p is not None for p in got) == {True: 200}


def test_an_aaaa_failure_does_not_stop_the_fetch_over_ipv4(tmp_path: Path) -> None:
    assert fetch_all({"v4.test": whole}, tmp_path, servfail_aaaa=True)[0] is not None


def test_tls_ca_file_adds_to_the_system_trust_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Documented as "besides the system's", it replaced it: every public policy host failed to verify.
    # Here the "system" store (SSL_CERT_FILE) trusts the policy host and tls_ca_file trusts another.
    private = tmp_path / "private-ca.pem"
    private.write_bytes(make_self_signed("internal.corp.test").cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "trusted.pem"))  # written by fetch_all
    assert fetch_all({"public.test": whole}, tmp_path, ca_file=private)[0] is not None


def test_a_ca_file_without_certificates_is_refused_by_check_config(tmp_path: Path) -> None:
    # It passed --check-config; at run time every domain with a policy record was deferred with
    # "routing error" until it expired.
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    (tmp_path / "c.toml").write_text('[smtp]\ntls_ca_file = "junk.pem"\n')
    done = subprocess.run([sys.executable, "-m", "fastmta", "serve", "--config", str(tmp_path / "c.toml"),
                           "--check-config"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "smtp.tls_ca_file" in done.stderr and "junk.pem" in done.stderr


def test_strict_where_the_rfc_is_and_not_beyond() -> None:
    # A non-ASCII digit is not a max_age (it escaped as a bare ValueError: "routing error" deferrals).
    with pytest.raises(PolicyError, match="max_age"):
        parse_policy("d.test", "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: \u00b2\n", "1")
    # Of a repeated key other than mx the first counts (RFC 8461 3.2).
    assert parse_policy("d.test", "version: STSv1\nversion: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n", "1")
    # Records not beginning "v=STSv1;" are discarded before counting (3.1).
    assert parse_record(["v=STSv1; id=a", "v=STSv1x; id=b"]) == "a"
    assert parse_record(["v=STSv1 ; id=c"]) == "c"
