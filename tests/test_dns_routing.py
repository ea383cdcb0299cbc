"""Routing end to end over real DNS: Router -> dnspython -> UDP/TCP -> test server on loopback.

Every count asserted here is counted at the DNS server, where a lookup
really happens, not inside the code under test.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from dnsserver import DNSServer
from fastmta.delivery.config import Config, DnsConfig, RoutingConfig
from fastmta.delivery.dns import DnsResolver
from fastmta.delivery.routing import Route, RouteError, RouteFailure, Router

Run = Callable[[Coroutine[Any, Any, Any]], Any]

ZONE = """
; two preferences
pref            MX 10 mx1.pref
pref            MX 20 mx2.pref
mx1.pref        A  127.0.0.11
mx2.pref        A  127.0.0.12
; equal preferences
equal           MX 10 a.equal
equal           MX 10 b.equal
equal           MX 30 c.equal
a.equal         A  127.0.0.21
b.equal         A  127.0.0.22
c.equal         A  127.0.0.23
; null MX (RFC 7505)
nullmx          MX 0 .
nullmx          A  127.0.0.99
; no MX: implicit MX on the domain's own addresses
implicit        A    127.0.0.31
implicit        AAAA ::1
; CNAME to a domain with MX, and CNAME to a host with only addresses
alias           CNAME pref
alias-implicit  CNAME implicit
; exists, but no MX and no addresses
empty           TXT "nothing here"
; MX hosts that do not resolve (one or all)
halfbroken      MX 10 gone.halfbroken
halfbroken      MX 20 ok.halfbroken
ok.halfbroken   A  127.0.0.41
allbroken       MX 10 gone1.allbroken
allbroken       MX 20 gone2.allbroken
; dual stack MX host
dual            MX 10 mx.dual
mx.dual         A    127.0.0.51
mx.dual         AAAA ::1
; two domains served by the same MX hosts (different preferences), one by a subset
shared-a        MX 10 mx1.provider
shared-a        MX 20 mx2.provider
shared-b        MX 5  mx2.provider
shared-b        MX 50 mx1.provider
shared-c        MX 10 mx1.provider
mx1.provider    A  127.0.0.61
mx2.provider    A  127.0.0.62
; odd but seen: a host listed twice, a null MX beside a real one
twice           MX 10 mx.twice
twice           MX 20 mx.twice
twice           MX 30 other.twice
mx.twice        A  127.0.0.91
other.twice     A  127.0.0.92
halfnull        MX 0 .
halfnull        MX 10 mx.halfnull
mx.halfnull     A  127.0.0.93
; a smarthost with a name
relay           A  127.0.0.71
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ns() -> Iterator[DNSServer]:
    with DNSServer({"example.test": ZONE, "xn--bcher-kva.test": "@ MX 10 mx\nmx A 127.0.0.81"}) as server:
        yield server
        assert server.errors == []


def make_router(
    ns: DNSServer,
    *,
    clock: Callable[[], float] | None = None,
    seed: int = 7,
    static: dict[str, list[str]] | None = None,
    smtp_port: int = 2525,
    **dns: Any,
) -> Router:
    dns.setdefault("timeout", 2.0)
    cfg = Config(
        dns=DnsConfig(nameservers=[ns.nameserver], **dns),
        routing=RoutingConfig(smtp_port=smtp_port, static=static or {}),
    )
    resolver = DnsResolver(cfg.dns, clock=clock) if clock else DnsResolver(cfg.dns)
    return Router(cfg, resolver=resolver, rng=random.Random(seed))


async def route(router: Router, domain: str) -> Route:
    result = await router.route(domain)
    assert isinstance(result, Route), result
    return result


async def failure(router: Router, domain: str) -> RouteFailure:
    result = await router.route(domain)
    assert isinstance(result, RouteFailure), result
    return result


# ---------------------------------------------------------------- MX order


def test_mx_preference_order_addresses_and_port(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        r = await route(make_router(ns), "pref.example.test")
        assert r.source == "mx"
        assert r.domain == "pref.example.test"
        assert [(h.name, h.preference, h.addresses, h.port) for h in r.hosts] == [
            ("mx1.pref.example.test", 10, ("127.0.0.11",), 2525),
            ("mx2.pref.example.test", 20, ("127.0.0.12",), 2525),
        ]
        assert r.targets() == [(r.hosts[0], "127.0.0.11"), (r.hosts[1], "127.0.0.12")]
        assert r.site == "mx1.pref.example.test,mx2.pref.example.test"

    run(main())


def test_equal_preferences_come_in_both_orders_reproducibly(run: Run, ns: DNSServer) -> None:
    async def orders(seed: int) -> list[tuple[str, ...]]:
        router = make_router(ns, seed=seed)
        seen = []
        for _ in range(40):
            r = await route(router, "Equal.Example.Test")
            seen.append(tuple(h.name.split(".")[0] for h in r.hosts))
        return seen

    async def main() -> None:
        first = await orders(3)
        # Equal preferences shuffle; the lower preference still comes last.
        assert set(first) == {("a", "b", "c"), ("b", "a", "c")}
        assert await orders(3) == first  # seeded: the same sequence again
        assert ns.count("equal.example.test", "MX") == 2  # one per router: cached

    run(main())


# ------------------------------------------------------- permanent failures


def test_null_mx_is_556_without_looking_up_any_host(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        f = await failure(make_router(ns), "nullmx.example.test")
        assert (f.reply.code, f.reply.enhanced, f.transient) == (556, "5.1.10", False)
        assert "null MX" in f.reply.text
        # The domain has an A record, but a null MX means "no mail": not even looked up.
        assert ns.count("nullmx.example.test", "A") == 0
        assert ns.count("nullmx.example.test", "AAAA") == 0
        err = f.error()
        assert isinstance(err, RouteError) and not err.transient and err.reply == f.reply

    run(main())


def test_nxdomain_is_permanent_550_5_1_2_and_cached_for_soa_minimum(run: Run, ns: DNSServer) -> None:
    clock = FakeClock()
    ns.add_zone("neg.test", "@ MX 10 mx\nmx A 127.0.0.1", soa_minimum=20)

    async def main() -> None:
        router = make_router(ns, clock=clock, negative_min_ttl=1, negative_max_ttl=1000)
        f = await failure(router, "missing.neg.test")
        assert (f.reply.code, f.reply.enhanced, f.transient) == (550, "5.1.2", False)
        clock.now += 19
        await failure(router, "missing.neg.test")
        assert ns.count("missing.neg.test", "MX") == 1  # RFC 2308: cached for the SOA minimum
        clock.now += 2
        await failure(router, "missing.neg.test")
        assert ns.count("missing.neg.test", "MX") == 2

    run(main())


def test_negative_ttl_is_clamped(run_uvloop: Run, ns: DNSServer) -> None:
    clock = FakeClock()
    ns.add_zone("neg.test", "", soa_minimum=3600)

    async def main() -> None:
        router = make_router(ns, clock=clock, negative_min_ttl=1, negative_max_ttl=10)
        await failure(router, "x.neg.test")
        clock.now += 11
        await failure(router, "x.neg.test")
        assert ns.count("x.neg.test", "MX") == 2

    run_uvloop(main())


def test_no_mx_and_no_address_is_550_5_4_4(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        f = await failure(make_router(ns), "empty.example.test")
        assert (f.reply.code, f.reply.enhanced, f.transient) == (550, "5.4.4", False)
        assert "no MX and no A/AAAA" in f.reply.text

    run(main())


def test_mx_hosts_without_addresses(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        router = make_router(ns)
        r = await route(router, "halfbroken.example.test")
        # The broken host is left out; the site still names the whole MX set.
        assert [h.name for h in r.hosts] == ["ok.halfbroken.example.test"]
        assert r.site == "gone.halfbroken.example.test,ok.halfbroken.example.test"
        f = await failure(router, "allbroken.example.test")
        assert (f.reply.code, f.reply.enhanced, f.transient) == (550, "5.4.4", False)
        assert "gone1.allbroken.example.test" in f.reply.text

    run(main())


def test_invalid_domain_is_553_5_1_3_without_a_query(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        router = make_router(ns)
        for bad in ["", "a..b", "x" * 64 + ".test", "bad\u2028domain.test", "sp ace.test", "at@sign.test"]:
            f = await failure(router, bad)
            assert (f.reply.code, f.reply.enhanced, f.transient) == (553, "5.1.3", False), bad
        assert ns.total() == 0

    run(main())


# ------------------------------------------------------- transient failures


def test_servfail_is_transient_then_the_zone_heals(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        router = make_router(ns)
        ns.servfail("pref.example.test")
        f = await failure(router, "pref.example.test")
        assert (f.reply.code, f.reply.enhanced, f.transient) == (451, "4.4.3", True)
        assert "SERVFAIL" in f.reply.text
        assert f.error().transient
        # Transient failures are not cached: the next try asks again.
        await failure(router, "pref.example.test")
        assert ns.count("pref.example.test", "MX") == 2
        ns.heal("pref.example.test")
        r = await route(router, "pref.example.test")
        assert [h.name for h in r.hosts] == ["mx1.pref.example.test", "mx2.pref.example.test"]
        assert ns.count("pref.example.test", "MX") == 3

    run(main())


def test_servfail_on_every_mx_host_address_is_transient(run_uvloop: Run, ns: DNSServer) -> None:
    async def main() -> None:
        ns.servfail("mx1.pref.example.test")
        ns.servfail("mx2.pref.example.test")
        f = await failure(make_router(ns), "pref.example.test")
        assert (f.reply.code, f.reply.enhanced, f.transient) == (451, "4.4.3", True)
        ns.heal()
        r = await route(make_router(ns), "pref.example.test")
        assert len(r.hosts) == 2

    run_uvloop(main())


def test_timeout_is_transient(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        ns.drop("pref.example.test")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        f = await failure(make_router(ns, timeout=0.3), "pref.example.test")
        elapsed = loop.time() - t0
        assert (f.reply.code, f.reply.enhanced, f.transient) == (451, "4.4.3", True)
        assert "timed out" in f.reply.text
        assert 0.25 <= elapsed < 2.0

    run(main())


# --------------------------------------------------- implicit MX and CNAMEs


def test_implicit_mx_uses_the_domains_own_addresses(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        r = await route(make_router(ns), "implicit.example.test")
        assert r.source == "implicit"
        assert [(h.name, h.preference, h.addresses) for h in r.hosts] == [
            ("implicit.example.test", 0, ("127.0.0.31", "::1"))
        ]
        assert r.site == "implicit.example.test"

    run(main())


def test_cname_chains_are_followed(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        router = make_router(ns)
        r = await route(router, "alias.example.test")
        assert r.domain == "alias.example.test"
        assert r.source == "mx"
        assert [h.name for h in r.hosts] == ["mx1.pref.example.test", "mx2.pref.example.test"]
        assert r.site == (await route(router, "pref.example.test")).site
        # CNAME to a name without MX: the canonical name is the implicit MX.
        r2 = await route(router, "alias-implicit.example.test")
        assert r2.source == "implicit"
        assert [(h.name, h.addresses) for h in r2.hosts] == [("implicit.example.test", ("127.0.0.31", "::1"))]

    run(main())


# -------------------------------------------------------- addresses and IDN


def test_ipv4_first_by_default_ipv6_first_when_preferred(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        r4 = await route(make_router(ns), "dual.example.test")
        assert r4.hosts[0].addresses == ("127.0.0.51", "::1")
        r6 = await route(make_router(ns, prefer_ipv6=True), "dual.example.test")
        assert r6.hosts[0].addresses == ("::1", "127.0.0.51")

    run(main())


def test_idn_domain_is_looked_up_as_a_label(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        router = make_router(ns)
        r = await route(router, "BÜCHER.test")
        assert r.domain == "xn--bcher-kva.test"
        assert [(h.name, h.addresses) for h in r.hosts] == [("mx.xn--bcher-kva.test", ("127.0.0.81",))]
        assert (await route(router, "xn--bcher-kva.test")) .site == r.site
        assert ns.count("xn--bcher-kva.test", "MX") == 1

    run(main())


def test_truncated_udp_answer_is_retried_over_tcp(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        ns.truncate("pref.example.test", "MX")
        r = await route(make_router(ns), "pref.example.test")
        assert [h.name for h in r.hosts] == ["mx1.pref.example.test", "mx2.pref.example.test"]
        assert ns.count("pref.example.test", "MX", tcp=True) == 1
        assert ns.count("pref.example.test", "MX") == 2  # UDP (truncated), then TCP

    run(main())


# ------------------------------------------------------------------ sites


def test_domains_with_the_same_mx_hosts_share_a_site(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        router = make_router(ns)
        a = await route(router, "shared-a.example.test")
        b = await route(router, "shared-b.example.test")
        c = await route(router, "shared-c.example.test")
        assert a.site == b.site == "mx1.provider.example.test,mx2.provider.example.test"
        assert [h.name for h in a.hosts] != [h.name for h in b.hosts]  # preferences differ
        assert c.site == "mx1.provider.example.test" != a.site

    run(main())


# ------------------------------------------------------------------ caching


def test_one_lookup_per_name_per_ttl(run: Run, ns: DNSServer) -> None:
    clock = FakeClock()
    ns.add_zone("ttl.test", "@ 5 MX 10 mx\nmx 5 A 127.0.0.1\nmx 8 AAAA ::1")

    async def main() -> None:
        router = make_router(ns, clock=clock, min_ttl=1, max_ttl=3600)
        for _ in range(20):
            await route(router, "ttl.test")
        assert (ns.count("ttl.test", "MX"), ns.count("mx.ttl.test", "A"), ns.count("mx.ttl.test", "AAAA")) == (1, 1, 1)
        clock.now += 4.9
        await route(router, "ttl.test")
        assert ns.count("ttl.test", "MX") == 1
        clock.now += 0.2  # MX and A (TTL 5) expired, AAAA (TTL 8) not
        for _ in range(5):
            await route(router, "ttl.test")
        assert (ns.count("ttl.test", "MX"), ns.count("mx.ttl.test", "A"), ns.count("mx.ttl.test", "AAAA")) == (2, 2, 1)
        clock.now += 3
        r = await route(router, "ttl.test")
        assert ns.count("mx.ttl.test", "AAAA") == 2
        assert r.hosts[0].addresses == ("127.0.0.1", "::1")

    run(main())


def test_ttls_are_clamped(run_uvloop: Run, ns: DNSServer) -> None:
    clock = FakeClock()
    ns.add_zone("short.test", "@ 1 MX 10 mx\nmx 1 A 127.0.0.1\nmx 1 AAAA ::1")
    ns.add_zone("long.test", "@ 86400 MX 10 mx\nmx 86400 A 127.0.0.1\nmx 86400 AAAA ::1")

    async def main() -> None:
        router = make_router(ns, clock=clock, min_ttl=30, max_ttl=60)
        await route(router, "short.test")
        await route(router, "long.test")
        clock.now += 29
        await route(router, "short.test")
        assert ns.count("short.test", "MX") == 1  # TTL 1 raised to min_ttl 30
        clock.now += 32
        await route(router, "long.test")
        assert ns.count("long.test", "MX") == 2  # TTL 86400 cut to max_ttl 60

    run_uvloop(main())


def test_records_changed_in_dns_are_seen_after_the_ttl(run_uvloop: Run, ns: DNSServer) -> None:
    clock = FakeClock()
    ns.add_zone("move.test", "@ 10 MX 10 old\nold 10 A 127.0.0.1\nnew 10 A 127.0.0.2")

    async def main() -> None:
        router = make_router(ns, clock=clock, min_ttl=1)
        assert (await route(router, "move.test")).hosts[0].name == "old.move.test"
        ns.set_records("move.test", "MX", "10 new.move.test.", ttl=10)
        assert (await route(router, "move.test")).hosts[0].name == "old.move.test"
        clock.now += 11
        r = await route(router, "move.test")
        assert [(h.name, h.addresses) for h in r.hosts] == [("new.move.test", ("127.0.0.2",))]
        assert r.site == "new.move.test"

    run_uvloop(main())


def test_thousand_concurrent_routes_make_one_query_each(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        router = make_router(ns)
        ns.delay = 0.05  # keep the first lookup in flight while the rest arrive
        results = await asyncio.wait_for(
            asyncio.gather(*(router.route("pref.example.test") for _ in range(1000))), 10
        )
        assert all(isinstance(r, Route) and r == results[0] for r in results)
        assert ns.count("pref.example.test", "MX") == 1
        for host in ("mx1.pref.example.test", "mx2.pref.example.test"):
            assert ns.count(host, "A") == 1
            assert ns.count(host, "AAAA") == 1
        assert ns.count("_mta-sts.pref.example.test", "TXT") == 1  # its MTA-STS record, once too
        assert ns.total() == 6

    run(main())


def test_concurrent_queries_are_bounded(run_uvloop: Run, ns: DNSServer) -> None:
    domains = [f"d{i}.bound.test" for i in range(12)]
    ns.add_zone("bound.test", "\n".join(f"d{i} MX 10 mx.bound.test." for i in range(12)) + "\nmx A 127.0.0.1")
    ns.delay = 0.05

    async def burst(max_concurrent: int) -> int:
        ns.peak_outstanding = 0
        router = make_router(ns, max_concurrent=max_concurrent)
        results = await asyncio.wait_for(asyncio.gather(*(router.route(d) for d in domains)), 10)
        assert all(isinstance(r, Route) for r in results)
        return ns.peak_outstanding

    async def main() -> None:
        assert await burst(3) <= 3
        # The control: without the bound, the same burst overlaps more.
        assert await burst(100) > 3

    run_uvloop(main())


def test_cache_is_bounded_lru(run_uvloop: Run, ns: DNSServer) -> None:
    async def main() -> None:
        router = make_router(ns, cache_size=2)
        for d in ["pref", "dual", "pref", "implicit", "pref", "dual"]:
            await route(router, f"{d}.example.test")
        # pref stayed (recently used); dual was evicted by implicit and asked again.
        assert ns.count("pref.example.test", "MX") == 1
        assert ns.count("dual.example.test", "MX") == 2

    run_uvloop(main())


# ------------------------------------------------------------ static routes


def test_static_routes_precedence_and_no_dns_for_literals(run: Run, ns: DNSServer) -> None:
    static = {
        "pref.example.test": ["127.0.0.5:2600", "[::1]:2601"],
        ".example.test": ["127.0.0.6"],
        "*.deep.example.test": ["127.0.0.7:2700"],
        "*": ["relay.example.test:587"],
    }

    async def main() -> None:
        router = make_router(ns, static=static)
        exact = await route(router, "PREF.example.test")
        assert exact.source == "static"
        assert [(h.name, h.addresses, h.port, h.preference) for h in exact.hosts] == [
            ("127.0.0.5", ("127.0.0.5",), 2600, 0),
            ("::1", ("::1",), 2601, 1),
        ]
        assert exact.site == "127.0.0.5:2600,[::1]:2601"
        sub = await route(router, "x.example.test")
        assert [(h.name, h.port) for h in sub.hosts] == [("127.0.0.6", 2525)]  # the MX port by default
        assert sub.site == "127.0.0.6"
        deep = await route(router, "a.b.deep.example.test")
        assert [(h.name, h.port) for h in deep.hosts] == [("127.0.0.7", 2700)]
        assert ns.total() == 0  # IP literals: nothing looked up, not even MX
        other = await route(router, "elsewhere.invalid")
        assert [(h.name, h.addresses, h.port) for h in other.hosts] == [
            ("relay.example.test", ("127.0.0.71",), 587)
        ]
        # A smarthost's name is looked up for addresses, never for MX.
        assert ns.count("relay.example.test", "A") == 1
        assert ns.count("relay.example.test", "MX") == 0
        assert ns.count("elsewhere.invalid") == 0
        # Every domain sent to the same smarthost shares its site.
        assert (await route(router, "another.invalid")).site == other.site == "relay.example.test:587"

    run(main())


def test_static_route_to_unresolvable_host(run_uvloop: Run, ns: DNSServer) -> None:
    async def main() -> None:
        router = make_router(ns, static={"*": ["nohost.example.test"]})
        f = await failure(router, "any.test")
        # A typo in our own configuration is never a hard bounce of the recipient.
        assert (f.reply.code, f.reply.enhanced, f.transient) == (451, "4.4.3", True)
        assert "check the configuration" in f.reply.text
        [problem] = await router.check_static_routes()
        assert problem.startswith("nohost.example.test: no such host")
        assert await make_router(ns, static={"*": ["relay.example.test", "127.0.0.9"]}).check_static_routes() == []
        ns.servfail("relay.example.test")
        router2 = make_router(ns, static={"*": ["relay.example.test"]})
        f2 = await failure(router2, "any.test")
        assert (f2.reply.code, f2.reply.enhanced, f2.transient) == (451, "4.4.3", True)

    run_uvloop(main())


def test_odd_mx_sets(run_uvloop: Run, ns: DNSServer) -> None:
    async def main() -> None:
        router = make_router(ns)
        twice = await route(router, "twice.example.test")
        assert [(h.name, h.preference) for h in twice.hosts] == [
            ("mx.twice.example.test", 10),
            ("other.twice.example.test", 30),
        ]
        # A "." beside real MX hosts is a broken null MX: the real hosts win.
        half = await route(router, "halfnull.example.test")
        assert [h.name for h in half.hosts] == ["mx.halfnull.example.test"]

    run_uvloop(main())


def test_silent_first_nameserver_falls_over_to_the_next(run: Run, ns: DNSServer) -> None:
    import socket

    # Bound but never read: queries to it vanish without an ICMP refusal,
    # like a nameserver that is down behind a firewall.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{silent.getsockname()[1]}"

        async def main() -> None:
            cfg = Config(dns=DnsConfig(nameservers=[dead, ns.nameserver], timeout=1.0))
            router = Router(cfg, rng=random.Random(1))  # owns its resolver
            try:
                r = await route(router, "pref.example.test")
                assert [h.name for h in r.hosts] == ["mx1.pref.example.test", "mx2.pref.example.test"]
            finally:
                await router.aclose()

        run(main())
