"""DNS lookups for mail routing: MX and A/AAAA, cached, typed.

The resolver is dnspython's asyncio resolver, configured only from
:class:`~fastmta.delivery.config.DnsConfig` (never from the environment when
nameservers are given), so tests point it at a server on loopback.

Every lookup ends in one of three ways:

- an answer with records (``Status.FOUND``);
- a negative answer, ``Status.NODATA`` (the name exists, no records of
  that type) or ``Status.NXDOMAIN`` (the name does not exist). Both are
  facts about the domain, cached for the SOA's negative TTL (RFC 2308)
  clamped to ``negative_min_ttl..negative_max_ttl``;
- :class:`DnsTemporaryError`: SERVFAIL, REFUSED, timeout, a malformed
  answer. Not cached, so the next attempt asks again; shared by every
  caller that was waiting on that same lookup.

Positive answers are cached for their TTL (the smallest along a CNAME
chain) clamped to ``min_ttl..max_ttl``. The cache is bounded (LRU) and
single-flight (see :mod:`fastmta.delivery.dns_cache`), and a semaphore bounds the
queries on the wire at once.

Names are handled as lower-case A-labels without the trailing dot; Unicode
(IDN) input is converted with :func:`fastmta.delivery.config.normalize_domain`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TLSA import TLSA

from fastmta.delivery.config import DnsConfig
from fastmta.delivery.dns_cache import CacheStats, Clock, TTLCache
from fastmta.errors import DeliveryError, Scope

__all__ = [
    "AddressAnswer",
    "DnsResolver",
    "DnsTemporaryError",
    "MxAnswer",
    "MxRecord",
    "Resolver",
    "Status",
    "TlsaAnswer",
    "TlsaRecord",
    "TxtAnswer",
]


class Status(str, Enum):
    FOUND = "found"
    NODATA = "nodata"  # the name exists, no records of this type
    NXDOMAIN = "nxdomain"  # the name does not exist


@dataclass(frozen=True, slots=True)
class MxRecord:
    preference: int
    host: str  # A-label, no trailing dot; "" for the null MX target "."


@dataclass(frozen=True, slots=True)
class MxAnswer:
    """The MX records of ``name`` (its canonical name after any CNAMEs)."""

    query: str
    name: str
    status: Status
    records: tuple[MxRecord, ...]
    expires: float  # on the resolver's clock
    #: The resolver said it validated the answer (DNSSEC, the AD bit): only a validating resolver
    #: on this host or a trusted path may be configured when DANE relies on it (RFC 7672 2.1).
    secure: bool = False

    @property
    def is_null(self) -> bool:
        """RFC 7505 null MX: the domain says it accepts no mail."""
        return self.status is Status.FOUND and all(r.host == "" for r in self.records)


@dataclass(frozen=True, slots=True)
class AddressAnswer:
    """The A or AAAA records of ``name`` (``family`` 4 or 6)."""

    query: str
    name: str
    family: int
    status: Status
    addresses: tuple[str, ...]
    expires: float
    secure: bool = False


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """One TLSA record (RFC 6698 2.1): certificate usage, selector, matching type, the data."""

    usage: int
    selector: int
    mtype: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TlsaAnswer:
    """The TLSA records of ``name`` (``_25._tcp.HOST``; RFC 7672 2.2.3)."""

    query: str
    name: str
    status: Status
    records: tuple[TlsaRecord, ...]
    expires: float
    secure: bool = False


@dataclass(frozen=True, slots=True)
class TxtAnswer:
    """The TXT records of ``name``, each record's strings joined (RFC 7208 3.3, RFC 8461 3.1)."""

    query: str
    name: str
    status: Status
    texts: tuple[str, ...]
    expires: float


class DnsTemporaryError(DeliveryError):
    """A lookup could not be completed now (SERVFAIL, timeout, ...); try later."""

    def __init__(self, name: str, rdtype: str, reason: str) -> None:
        super().__init__(f"DNS {rdtype} lookup for {name} failed: {reason}", scope=Scope.SITE, transient=True)
        self.name = name
        self.rdtype = rdtype
        self.reason = reason


class Resolver(Protocol):
    """What routing needs from DNS (the seam between routing and dnspython)."""

    @property
    def clock(self) -> Clock: ...

    async def mx(self, domain: str) -> MxAnswer: ...

    async def addresses(self, host: str, family: int) -> AddressAnswer: ...


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _negative_ttl(response: dns.message.Message | None) -> int | None:
    """RFC 2308: min(SOA TTL, SOA MINIMUM) from the response's authority section."""
    if not isinstance(response, dns.message.QueryMessage):
        return None
    try:
        return int(response.resolve_chaining().minimum_ttl)
    except dns.exception.DNSException:
        return None


_Key = tuple[str, int]
_Answer = MxAnswer | AddressAnswer | TxtAnswer | TlsaAnswer


class DnsResolver:
    """dnspython-backed :class:`Resolver` with a TTL cache.

    One instance per engine; it must be used from one event loop.
    """

    def __init__(self, config: DnsConfig, *, clock: Clock = time.monotonic) -> None:
        self._config = config
        if config.nameservers:
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = [
                dns.nameserver.Do53Nameserver(hp.host, hp.port) for hp in config.nameserver_addresses()
            ]
        else:
            res = dns.asyncresolver.Resolver(configure=True)  # the system's resolv.conf
        res.lifetime = config.timeout
        # A try at one server gets a share of the lifetime (at most 2 s), so
        # a silent first server leaves time to ask the next one.
        res.timeout = min(2.0, config.timeout / max(1, len(res.nameservers)))
        res.retry_servfail = False  # SERVFAIL is an answer: transient, reported at once
        res.cache = None  # ours is bounded, single-flight and clamps TTLs
        # AD in the query asks the resolver to say whether it validated the answer (RFC 6840 5.7),
        # without DO's signatures: DANE needs to know that MX, address and TLSA answers are secure.
        res.flags = dns.flags.RD | dns.flags.AD
        self._res = res
        self._cache: TTLCache[_Key, _Answer] = TTLCache(config.cache_size, clock)
        self._sem = asyncio.Semaphore(config.max_concurrent)
        self._in_flight = 0
        self.peak_in_flight = 0  # most queries on the wire at once (observability, tests)

    @property
    def clock(self) -> Clock:
        return self._cache.clock

    @property
    def stats(self) -> CacheStats:
        return self._cache.stats

    async def aclose(self) -> None:
        await self._cache.aclose()

    # ---------------------------------------------------------------- API

    async def mx(self, domain: str) -> MxAnswer:
        """MX records of *domain* (A-label, as from ``normalize_domain``)."""
        answer, _ = await self._cache.get_or_load(
            (domain, dns.rdatatype.MX), lambda: self._load(domain, dns.rdatatype.MX)
        )
        assert isinstance(answer, MxAnswer)
        return answer

    async def addresses(self, host: str, family: int) -> AddressAnswer:
        """A (``family=4``) or AAAA (``family=6``) records of *host*."""
        rdtype = dns.rdatatype.A if family == 4 else dns.rdatatype.AAAA
        answer, _ = await self._cache.get_or_load((host, rdtype), lambda: self._load(host, rdtype))
        assert isinstance(answer, AddressAnswer)
        return answer

    async def txt(self, name: str) -> TxtAnswer:
        """TXT records of *name* (MTA-STS's ``_mta-sts.DOMAIN``); undecodable octets replaced."""
        answer, _ = await self._cache.get_or_load((name, dns.rdatatype.TXT), lambda: self._load(name, dns.rdatatype.TXT))
        assert isinstance(answer, TxtAnswer)
        return answer

    async def tlsa(self, name: str) -> TlsaAnswer:
        """TLSA records of *name* (``_25._tcp.HOST``), with whether the resolver validated them."""
        answer, _ = await self._cache.get_or_load(
            (name, dns.rdatatype.TLSA), lambda: self._load(name, dns.rdatatype.TLSA))
        assert isinstance(answer, TlsaAnswer)
        return answer

    async def alias_secure(self, name: str) -> bool:
        """Is *name* a CNAME whose own record the resolver validated? (Asked for the CNAME type, the
        answer is the alias's RRset, not chased into its target's zone.) Not cached: asked only for
        an MX host whose addresses came insecure through an alias, and the route is memoized."""
        try:
            answer = await self._query(name, dns.rdatatype.CNAME)
        except (dns.resolver.NXDOMAIN, dns.name.NameTooLong):
            return False
        except dns.exception.DNSException as exc:
            raise self._temporary(name, "CNAME", exc) from None
        return answer.rrset is not None and bool(answer.response.flags & dns.flags.AD)

    # ------------------------------------------------------------ loading

    def _clamp(self, ttl: int, negative: bool) -> int:
        c = self._config
        lo, hi = (c.negative_min_ttl, c.negative_max_ttl) if negative else (c.min_ttl, c.max_ttl)
        return max(lo, min(hi, ttl))

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.resolver.Answer:
        async with self._sem:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            try:
                return await self._res.resolve(
                    dns.name.from_text(name + "."), rdtype, raise_on_no_answer=False, search=False
                )
            finally:
                self._in_flight -= 1

    async def _load(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[_Answer, float]:
        type_text = rdtype.name
        try:
            answer = await self._query(name, rdtype)
        except dns.resolver.NXDOMAIN as exc:
            responses: dict[dns.name.Name, dns.message.Message] = exc.kwargs.get("responses") or {}
            response = next(iter(responses.values()), None)
            ttl = _negative_ttl(response)
            neg_ttl = self._clamp(self._config.negative_min_ttl if ttl is None else ttl, True)
            secure = response is not None and bool(response.flags & dns.flags.AD)
            return self._make(name, name, rdtype, Status.NXDOMAIN, [], neg_ttl, secure), neg_ttl
        except dns.name.NameTooLong:
            # Permanent, but a fact about the input, not the DNS: callers
            # validate names before they get here. Report it as NXDOMAIN.
            neg = self._config.negative_max_ttl
            return self._make(name, name, rdtype, Status.NXDOMAIN, [], neg), neg
        except dns.exception.DNSException as exc:
            raise self._temporary(name, type_text, exc) from None
        canonical = _text(answer.canonical_name)
        ttl = answer.chaining_result.minimum_ttl
        secure = bool(answer.response.flags & dns.flags.AD)
        if answer.rrset is None:
            neg_ttl = self._clamp(ttl, True)
            return self._make(name, canonical, rdtype, Status.NODATA, [], neg_ttl, secure), neg_ttl
        pos_ttl = self._clamp(ttl, False)
        return self._make(name, canonical, rdtype, Status.FOUND, list(answer.rrset), pos_ttl, secure), pos_ttl

    def _temporary(self, name: str, type_text: str, exc: dns.exception.DNSException) -> DnsTemporaryError:
        if isinstance(exc, dns.resolver.LifetimeTimeout):
            return DnsTemporaryError(name, type_text, f"timed out after {self._config.timeout:g}s")
        if isinstance(exc, dns.resolver.NoNameservers):
            return DnsTemporaryError(name, type_text, _nameserver_reason(exc))
        return DnsTemporaryError(name, type_text, str(exc) or type(exc).__name__)

    def _make(
        self,
        query: str,
        name: str,
        rdtype: dns.rdatatype.RdataType,
        status: Status,
        rdatas: list[object],
        ttl: int,
        secure: bool = False,
    ) -> _Answer:
        # The cache stamps the same expiry (same clock, same ttl), so an
        # answer carries its own staleness for callers that compose routes.
        expires = self.clock() + ttl
        if rdtype == dns.rdatatype.MX:
            records = tuple(
                sorted(
                    (
                        # The null MX target "." becomes "" (RFC 7505).
                        MxRecord(rd.preference, "" if rd.exchange == dns.name.root else _text(rd.exchange))
                        for rd in rdatas
                        if isinstance(rd, MX)
                    ),
                    key=lambda r: (r.preference, r.host),
                )
            )
            return MxAnswer(query, name, status, records, expires, secure)
        if rdtype == dns.rdatatype.TLSA:
            tlsa = tuple(TlsaRecord(rd.usage, rd.selector, rd.mtype, rd.cert) for rd in rdatas if isinstance(rd, TLSA))
            return TlsaAnswer(query, name, status, tlsa, expires, secure)
        if rdtype == dns.rdatatype.TXT:
            texts = tuple(b"".join(rd.strings).decode("utf-8", "replace") for rd in rdatas)  # type: ignore[attr-defined]
            return TxtAnswer(query, name, status, texts, expires)
        family = 4 if rdtype == dns.rdatatype.A else 6
        addrs = tuple(sorted({str(rd.address) for rd in rdatas}))  # type: ignore[attr-defined]
        return AddressAnswer(query, name, family, status, addrs, expires, secure)


def _nameserver_reason(exc: dns.resolver.NoNameservers) -> str:
    # dnspython keeps (server, tcp, port, error, response) per attempt.
    errors = exc.kwargs.get("errors") or []
    parts = [f"{err[0]} answered {err[3]}" for err in errors if len(err) > 3]
    return "; ".join(parts) if parts else "no nameserver could answer"
