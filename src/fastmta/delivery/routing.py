"""Routing: recipient domain -> the hosts to try, grouped into sites.

:meth:`Router.route` answers either a :class:`Route` (hosts in the order
to try, each with its addresses in the order to try) or a
:class:`RouteFailure` carrying the locally made reply to record for every
recipient at that domain and whether a retry can help:

=========================================  ===  ========  =========
case                                       code enhanced  transient
=========================================  ===  ========  =========
null MX (RFC 7505, ``MX 0 .``)             556  5.1.10    no
domain does not exist (NXDOMAIN)           550  5.1.2     no
no usable host: MX hosts without address,  550  5.4.4     no
or no MX and no A/AAAA (nowhere to route)
domain is not a valid DNS name             553  5.1.3     no
SERVFAIL, timeout, other DNS trouble       451  4.4.3     yes
=========================================  ===  ========  =========

5.1.2 ("bad destination system address") says the domain itself is wrong;
5.4.4 ("unable to route") says it exists but mail for it has nowhere to go,
as Postfix reports it.

Order: static routes first (exact domain, then the longest matching
``.parent`` pattern, then ``*``); otherwise MX records by preference, equal
preferences in random order on every call (load spreading across a
provider's equal MX hosts, as RFC 5321 5.1 asks); a domain without MX
records is its own implicit MX (preference 0; the canonical name when the
domain is a CNAME). A scheduler walks ``route.hosts`` and each host's
``addresses`` in order, falling over to the next when one refuses.

Sites: a site is the set of hosts a domain's mail goes to. Domains whose MX
host name sets are equal share one site, whatever their preferences or
order, so every domain hosted by one provider shares one ready queue and
one throttle (KumoMTA's ``site_name``). The name is the sorted, comma
joined host names, each with ``:port`` when its port is not the MX port.
Static routes name their sites the same way, so a smarthost shared by many
patterns is one site.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from fastmta.delivery.config import Config, HostPort, normalize_domain
from fastmta.delivery.dane import DaneHost, usable_records
from fastmta.delivery.dns import AddressAnswer, DnsResolver, DnsTemporaryError, MxAnswer, Resolver, Status
from fastmta.delivery.dns_cache import TTLCache
from fastmta.delivery.mta_sts import VERIFIED_SITE, Policy, PolicyCache, mx_allowed
from fastmta.errors import DeliveryError, Scope
from fastmta.smtp.reply import Reply

__all__ = [
    "DANE_SITE",
    "Route",
    "RouteError",
    "RouteFailure",
    "RouteHost",
    "RouteSource",
    "Router",
    "site_name",
]

RouteSource = Literal["mx", "implicit", "static"]

log = logging.getLogger("fastmta.delivery.routing")

#: The site marker of a route with DANE hosts (see Router._from_mx).
DANE_SITE = "(dane)"

#: How long a static route whose hosts are all IP literals stays memoized;
#: it cannot change, the bound only keeps the memo an LRU like the rest.
_STATIC_TTL = 3600.0


@dataclass(frozen=True, slots=True)
class RouteHost:
    """One host to connect to; ``addresses`` in the order to try (never empty)."""

    name: str  # A-label host name, or an IP literal from a static route
    addresses: tuple[str, ...]
    port: int
    preference: int
    #: DANE (RFC 7672): STARTTLS required and the certificate checked against these TLSA records;
    #: None when DANE does not apply to the host (not enabled, or its DNS is not DNSSEC-signed).
    dane: DaneHost | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """Where mail for ``domain`` goes: ``hosts`` in the order to try."""

    domain: str  # A-label
    site: str
    hosts: tuple[RouteHost, ...]
    source: RouteSource
    expires: float  # on the resolver's clock: route again after this

    def targets(self) -> list[tuple[RouteHost, str]]:
        """Every (host, address) pair in the order to try."""
        return [(h, a) for h in self.hosts for a in h.addresses]


class RouteError(DeliveryError):
    """A domain could not be routed; ``reply`` is what to record for its recipients."""

    def __init__(self, domain: str, reply: Reply, transient: bool) -> None:
        # SITE: the failure concerns every recipient at this domain, not one.
        super().__init__(f"{domain}: {reply}", scope=Scope.SITE, transient=transient)
        self.domain = domain
        self.reply = reply


@dataclass(frozen=True, slots=True)
class RouteFailure:
    """No route for ``domain``; ``reply`` is a local reply (see module docs)."""

    domain: str
    reply: Reply
    transient: bool
    expires: float

    def error(self) -> RouteError:
        return RouteError(self.domain, self.reply, self.transient)


def site_name(hosts: Iterable[tuple[str, int]], mx_port: int) -> str:
    """Name of the site made of *hosts* ((name, port) pairs): order-free, duplicate-free."""
    return ",".join(sorted({name if port == mx_port else f"{_hostport_text(name, port)}" for name, port in hosts}))


def _hostport_text(name: str, port: int) -> str:
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(slots=True)
class _HostLookup:
    addresses: tuple[str, ...]
    transient: str | None  # why a family could not be looked up now
    expires: float
    #: Every address answer DNSSEC-validated (none failed): DANE may apply (RFC 7672 2.2.2).
    secure: bool = False
    canonical: str = ""  # the name the addresses belong to, after any CNAME


def _shuffle_ties(hosts: Sequence[RouteHost], rng: random.Random) -> tuple[RouteHost, ...]:
    out: list[RouteHost] = []
    i, n = 0, len(hosts)
    while i < n:
        j = i + 1
        while j < n and hosts[j].preference == hosts[i].preference:
            j += 1
        group = list(hosts[i:j])
        if len(group) > 1:
            rng.shuffle(group)
        out.extend(group)
        i = j
    return tuple(out)


def _has_ties(hosts: Sequence[RouteHost]) -> bool:
    return any(hosts[k].preference == hosts[k - 1].preference for k in range(1, len(hosts)))


class Router:
    """Routes domains with static routes, MX lookups and a per-domain memo.

    *resolver* defaults to a :class:`~fastmta.delivery.dns.DnsResolver` built from
    ``config.dns`` (owned, closed by :meth:`aclose`). *rng* orders equal MX
    preferences; pass a seeded ``random.Random`` for repeatable tests.
    """

    def __init__(
        self,
        config: Config,
        *,
        resolver: Resolver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._owned = resolver is None
        self._resolver: Resolver = resolver if resolver is not None else DnsResolver(config.dns)
        self._clock = self._resolver.clock
        self._rng = rng if rng is not None else random.Random()
        self._mx_port = config.routing.smtp_port
        self._prefer_v6 = config.dns.prefer_ipv6
        self._exact: dict[str, list[HostPort]] = {}
        self._parent: dict[str, list[HostPort]] = {}
        self._default: list[HostPort] | None = None
        for pattern, hosts in config.routing.static_routes().items():
            if pattern == "*":
                self._default = hosts
            elif pattern.startswith("."):
                self._parent[pattern[1:]] = hosts
            else:
                self._exact[pattern] = hosts
        # Composed routes per domain, until the earliest of their DNS answers
        # expires: the hot path (a recipient batch asking where to go) is
        # one dict lookup plus, for equal MX preferences, a shuffle.
        self._memo: TTLCache[str, Route | RouteFailure] = TTLCache(config.dns.cache_size, self._clock)
        #: MTA-STS policies (RFC 8461), for routes from MX records: needs the resolver's TXT lookups.
        self.mta_sts: PolicyCache | None = None
        if config.smtp.mta_sts.enabled and isinstance(self._resolver, DnsResolver):
            self.mta_sts = PolicyCache(config.smtp.mta_sts, self._resolver, ca_file=config.smtp.tls_ca_file)
        #: DANE (RFC 7672) for routes from DNSSEC-signed MX records: needs the resolver's TLSA lookups.
        self._dane = config.smtp.dane and isinstance(self._resolver, DnsResolver)

    @property
    def resolver(self) -> Resolver:
        return self._resolver

    async def aclose(self) -> None:
        await self._memo.aclose()
        if self.mta_sts is not None:
            await self.mta_sts.aclose()
        if self._owned and isinstance(self._resolver, DnsResolver):
            await self._resolver.aclose()

    def static_hosts(self, domain: str) -> list[HostPort] | None:
        """The static route hosts for *domain* (A-label), or None to use DNS."""
        hosts = self._exact.get(domain)
        if hosts is not None:
            return hosts
        d = domain
        while (dot := d.find(".")) >= 0:
            d = d[dot + 1 :]
            hosts = self._parent.get(d)
            if hosts is not None:
                return hosts
        return self._default

    def route_cached(self, domain: str) -> Route | RouteFailure | None:
        """The memoized answer of :meth:`route` without awaiting, or None when a lookup is needed.

        The engine's hot path: a campaign sends most recipients to domains it
        has already routed, and skipping the coroutine and task saves more
        than the lookup itself costs.
        """
        try:
            name = normalize_domain(domain)
        except ValueError:
            return None  # route() produces the proper failure
        entry = self._memo.get(name)
        if entry is None:
            return None
        self._memo.stats.hits += 1
        result = entry[0]
        if isinstance(result, Route) and result.source != "static" and _has_ties(result.hosts):
            return Route(result.domain, result.site, _shuffle_ties(result.hosts, self._rng), result.source, result.expires)
        return result

    async def route(self, domain: str) -> Route | RouteFailure:
        """Where to deliver mail for *domain* (any case, Unicode or A-label)."""
        try:
            name = normalize_domain(domain)
        except ValueError as exc:
            return RouteFailure(
                domain, Reply.local(553, "5.1.3", f"invalid recipient domain: {exc}"), False, self._clock()
            )
        result, _ = await self._memo.get_or_load(name, lambda: self._compose(name))
        if isinstance(result, Route) and result.source != "static" and _has_ties(result.hosts):
            return Route(result.domain, result.site, _shuffle_ties(result.hosts, self._rng), result.source, result.expires)
        return result

    # ----------------------------------------------------------- composing

    def _ttl(self, result: Route | RouteFailure) -> tuple[Route | RouteFailure, float]:
        # Transient failures are not memoized: the next call asks DNS again.
        if isinstance(result, RouteFailure) and result.transient:
            return result, 0.0
        return result, result.expires - self._clock()

    def _fail(self, domain: str, code: int, enhanced: str, text: str, expires: float) -> RouteFailure:
        return RouteFailure(domain, Reply.local(code, enhanced, text), code < 500, expires)

    async def _compose(self, domain: str) -> tuple[Route | RouteFailure, float]:
        static = self.static_hosts(domain)
        if static is not None:
            return self._ttl(await self._static(domain, static))
        try:
            mx = await self._resolver.mx(domain)
        except DnsTemporaryError as exc:
            return self._ttl(self._fail(domain, 451, "4.4.3", f"MX lookup for {domain} failed: {exc.reason}", self._clock()))
        route = await self._from_mx(domain, mx)
        if self.mta_sts is not None and isinstance(route, Route):
            route = self._under_policy(route, await self.mta_sts.policy(domain))
        return self._ttl(route)

    def _under_policy(self, route: Route, policy: Policy | None) -> Route | RouteFailure:
        """*route* as *policy* (MTA-STS) allows it.

        ``enforce``: only the MX hosts the policy lists, in a site of their own
        whose connections require STARTTLS and a certificate valid for the
        host's name (``mta_sts.VERIFIED_SITE``); none listed defers the mail
        (the policy is looked up again before each retry, never bounced on
        that alone: RFC 8461 5.1). ``testing``: the route as it is, the
        mismatch logged.
        """
        if policy is None:
            return route
        hosts = tuple(h for h in route.hosts if mx_allowed(h.name, policy.mx))
        if policy.mode != "enforce":
            if len(hosts) < len(route.hosts):
                log.warning("MTA-STS policy of %s (testing, id %s) does not list MX %s", route.domain, policy.id,
                            ", ".join(h.name for h in route.hosts if h not in hosts))
            return route
        if not hosts:
            names = ", ".join(h.name for h in route.hosts)
            return self._fail(route.domain, 451, "4.7.5",
                              f"MTA-STS policy of {route.domain} (enforce, id {policy.id}) lists none of its MX "
                              f"hosts ({names})", self._clock())
        dane = f",{DANE_SITE}" if any(h.dane is not None for h in hosts) else ""
        site = site_name(((h.name, h.port) for h in hosts), self._mx_port) + dane + "," + VERIFIED_SITE
        return Route(route.domain, site, hosts, route.source, route.expires)

    async def _from_mx(self, domain: str, mx: MxAnswer) -> Route | RouteFailure:
        if mx.status is Status.NXDOMAIN:
            return self._fail(domain, 550, "5.1.2", f"domain {domain} does not exist (NXDOMAIN)", mx.expires)
        if mx.is_null:
            return self._fail(domain, 556, "5.1.10", f"domain {domain} accepts no mail (null MX)", mx.expires)
        if mx.status is Status.NODATA or not mx.records:
            # RFC 5321 5.1: no MX -> the domain (its canonical name) is the host.
            targets = [(0, mx.name)]
            source: RouteSource = "implicit"
        else:
            # A "." target beside real ones is a broken null MX: ignore it.
            # A host listed twice keeps its best (first, records are sorted) preference.
            seen: set[str] = set()
            targets = []
            for r in mx.records:
                if r.host and r.host not in seen:
                    seen.add(r.host)
                    targets.append((r.preference, r.host))
            source = "mx"
        site = site_name(((h, self._mx_port) for _, h in targets), self._mx_port)
        lookups = await asyncio.gather(*(self._lookup_host(h) for _, h in targets))
        hosts = [
            RouteHost(h, look.addresses, self._mx_port, pref)
            for (pref, h), look in zip(targets, lookups)
            if look.addresses
        ]
        expires = min([mx.expires, *(look.expires for look in lookups)])
        if self._dane and mx.secure and hosts:
            secured = await self._with_dane(hosts, {h: look for (_, h), look in zip(targets, lookups)})
            if isinstance(secured, str):
                return self._fail(domain, 451, "4.7.5", secured, self._clock())
            hosts, expires = secured[0], min(expires, secured[1])
            if any(h.dane is not None for h in hosts):
                # DANE is a fact about this domain's (signed) MX answer, not about the hosts: its connections
                # are never those of a domain routed to the same hosts without it (a site of its own).
                site = f"{site},{DANE_SITE}"
        if hosts:
            if any(look.transient for look in lookups):
                expires = self._clock()  # partial: route now, ask again next time
            return Route(domain, site, tuple(hosts), source, expires)
        transient = [look.transient for look in lookups if look.transient]
        if transient:
            return self._fail(domain, 451, "4.4.3", f"address lookup failed: {transient[0]}", self._clock())
        if source == "implicit":
            text = f"domain {domain} has no MX and no A/AAAA records"
        else:
            text = f"no MX host of {domain} has an address ({', '.join(h for _, h in targets)})"
        return self._fail(domain, 550, "5.4.4", text, expires)

    async def _with_dane(
        self, hosts: list[RouteHost], lookups: dict[str, _HostLookup]
    ) -> tuple[list[RouteHost], float] | str:
        """*hosts* (of a DNSSEC-signed MX answer) with what DANE asks of each (RFC 7672 2.2).

        A host whose addresses are signed has its TLSA records looked up (at its CNAME target first,
        then at its own name): signed ones apply. A host whose TLSA lookup fails is left out, as
        the RFC asks (2.2.3: a failed lookup may hide records an attacker removed); when that leaves
        none, why (the mail is deferred).
        """
        assert isinstance(self._resolver, DnsResolver)
        resolver = self._resolver
        expires = min(look.expires for look in lookups.values())

        async def one(host: RouteHost) -> RouteHost | str:
            nonlocal expires
            look = lookups[host.name]
            if look.secure:
                bases = [look.canonical, host.name] if look.canonical != host.name else [host.name]
            elif look.canonical == host.name:
                return host
            else:
                # A signed alias into an unsigned zone (a hosting provider's): the TLSA records at
                # the alias's own name still apply (RFC 7672 2.2.2; KumoMTA's resolve_secure_cname).
                try:
                    if not await resolver.alias_secure(host.name):
                        return host
                except DnsTemporaryError as exc:
                    return f"CNAME lookup for {host.name} failed: {exc.reason}"
                bases = [host.name]
            for base in bases:
                try:
                    answer = await resolver.tlsa(f"_{host.port}._tcp.{base}")
                except DnsTemporaryError as exc:
                    return f"TLSA lookup for {host.name} failed: {exc.reason}"
                expires = min(expires, answer.expires)
                if answer.status is Status.FOUND and answer.secure:
                    dane = DaneHost(usable_records(answer.records), tuple(dict.fromkeys(bases)))
                    return RouteHost(host.name, host.addresses, host.port, host.preference, dane)
                if answer.status is Status.FOUND or not answer.secure:
                    break  # unsigned records, or an unsigned denial: no DANE for this host
            return host

        results = await asyncio.gather(*(one(h) for h in hosts))
        kept = [r for r in results if isinstance(r, RouteHost)]
        if not kept:
            return "; ".join(r for r in results if isinstance(r, str))
        for why in (r for r in results if isinstance(r, str)):
            log.warning("DANE: %s; that MX host is left out", why)
            expires = self._clock()  # partial: asked again next time, not left out for the route's TTL
        return kept, expires

    async def _static(self, domain: str, static: list[HostPort]) -> Route | RouteFailure:
        site = site_name(((hp.host, hp.port) for hp in static), self._mx_port)
        lookups = await asyncio.gather(*(self._lookup_host(hp.host) for hp in static))
        hosts = [
            RouteHost(hp.host, look.addresses, hp.port, pref)
            for pref, (hp, look) in enumerate(zip(static, lookups))
            if look.addresses
        ]
        expires = min(look.expires for look in lookups)
        if hosts:
            if any(look.transient for look in lookups):
                expires = self._clock()
            return Route(domain, site, tuple(hosts), "static", expires)
        transient = [look.transient for look in lookups if look.transient]
        if transient:
            return self._fail(domain, 451, "4.4.3", f"static route host lookup failed: {transient[0]}", self._clock())
        # Our configuration names a host that does not resolve: a typo in
        # --relay or a transport map, not a fact about the recipient's domain.
        # Deferred, never a hard bounce (a suppression list would keep it).
        names = ", ".join(str(hp) for hp in static)
        return self._fail(
            domain, 451, "4.4.3", f"no static route host has an address ({names}): check the configuration", expires
        )

    async def check_static_routes(self) -> list[str]:
        """Every static route host that has no address, with why: to refuse a bad configuration at start."""
        problems: list[str] = []
        routes = [*self._exact.values(), *self._parent.values()]
        if self._default is not None:
            routes.append(self._default)
        hosts = sorted({hp.host for hosts in routes for hp in hosts if not _is_ip(hp.host)})
        lookups = await asyncio.gather(*(self._lookup_host(h) for h in hosts))
        for host, look in zip(hosts, lookups):
            if not look.addresses:
                problems.append(f"{host}: {look.transient or 'no such host (no A or AAAA record)'}")
        return problems

    async def _lookup_host(self, host: str) -> _HostLookup:
        if _is_ip(host):
            return _HostLookup((host,), None, self._clock() + _STATIC_TTL)
        families = (6, 4) if self._prefer_v6 else (4, 6)
        results = await asyncio.gather(
            *(self._resolver.addresses(host, f) for f in families), return_exceptions=True
        )
        addresses: list[str] = []
        transient: str | None = None
        expires = self._clock() + _STATIC_TTL
        answered, canonical = [], host
        for res in results:
            if isinstance(res, AddressAnswer):
                addresses.extend(res.addresses)
                expires = min(expires, res.expires)
                answered.append(res.secure)
                if res.addresses:
                    canonical = res.name
            elif isinstance(res, DnsTemporaryError):
                transient = str(res)
            elif isinstance(res, BaseException):
                raise res
        # Secure when every family that answered is: a family whose lookup failed gives no address to
        # use, and counting it as "insecure" let whoever can make one lookup fail strip DANE.
        return _HostLookup(tuple(addresses), transient, expires, bool(answered) and all(answered), canonical)
