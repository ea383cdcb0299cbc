"""Synchronous DNS lookups for the checks, always through the configured resolver.

``[dns] nameservers`` of the configuration (tests: the loopback server), or
the system's resolv.conf when none are given, exactly as the engine's
resolver (:mod:`fastmta.delivery.dns`) chooses. No cache: a check asks each
question once or twice.

Each lookup returns the records, or an empty list for a negative answer
(NXDOMAIN or no data); a failure that says nothing about the domain
(SERVFAIL, timeout, no server answering) raises :class:`DnsFailure`.

Also the organizational domain (RFC 7489 3.2) from the Public Suffix List
that the ``publicsuffixlist`` package ships (no download at run time).
"""

from __future__ import annotations

import functools
import ipaddress

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

from fastmta.delivery.config import DnsConfig

__all__ = ["DnsFailure", "Lookup", "aligned", "known_suffix", "org_domain", "same_ip"]

#: Reserved top-level names (RFC 2606, RFC 6761) that are not in the Public
#: Suffix List but are real suffixes for documentation and tests.
_RESERVED = frozenset({"example", "test", "invalid", "localhost"})


class DnsFailure(Exception):
    """A lookup that failed without an answer (SERVFAIL, timeout, REFUSED)."""


class Lookup:
    """TXT, A/AAAA, PTR and MX lookups through the configured nameservers."""

    def __init__(self, config: DnsConfig) -> None:
        if config.nameservers:
            res = dns.resolver.Resolver(configure=False)
            res.nameservers = [dns.nameserver.Do53Nameserver(hp.host, hp.port) for hp in config.nameserver_addresses()]
        else:
            res = dns.resolver.Resolver(configure=True)
        res.lifetime = config.timeout
        res.timeout = min(2.0, config.timeout / max(1, len(res.nameservers)))
        res.retry_servfail = False
        self._res = res
        self.timeout = config.timeout

    def resolve(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        """The records of (*name*, *rdtype*) (CNAMEs followed); [] when there are none."""
        try:
            answer = self._res.resolve(
                dns.name.from_text(name.rstrip(".") + "."), rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN:
            return []
        except dns.resolver.NoNameservers as exc:
            raise DnsFailure(f"{name} {rdtype}: {exc}") from None
        except dns.exception.Timeout:
            raise DnsFailure(f"{name} {rdtype}: timed out after {self.timeout:g} s") from None
        except dns.exception.DNSException as exc:
            raise DnsFailure(f"{name} {rdtype}: {exc}") from None
        return list(answer.rrset) if answer.rrset is not None else []

    def txt(self, name: str) -> list[str]:
        """Each TXT record of *name*, its strings joined (RFC 7208 3.3), decoded as Latin-1 (bytes kept)."""
        return [b"".join(r.strings).decode("latin-1") for r in self.resolve(name, "TXT")]  # type: ignore[attr-defined]

    def addresses(self, name: str) -> list[str]:
        """A and AAAA records of *name*, as text."""
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            found += [r.address for r in self.resolve(name, rdtype)]  # type: ignore[attr-defined]
        return found

    def ptr(self, ip: str) -> list[str]:
        """The PTR names of *ip*, without the trailing dot."""
        name = dns.reversename.from_address(ip).to_text()
        return [r.target.to_text(omit_final_dot=True).lower() for r in self.resolve(name, "PTR")]  # type: ignore[attr-defined]

    def mx(self, domain: str) -> list[tuple[int, str]]:
        """(preference, host) of each MX record, best first; host "" is a null MX (RFC 7505)."""
        records = [
            (r.preference, r.exchange.to_text(omit_final_dot=True).lower())  # type: ignore[attr-defined]
            for r in self.resolve(domain, "MX")
        ]
        return sorted(records)


def same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


@functools.lru_cache(maxsize=1)
def _psl() -> object:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


@functools.lru_cache(maxsize=1024)
def org_domain(domain: str) -> str:
    """The organizational domain: the public suffix plus one label (``news.example.com`` -> ``example.com``)."""
    from publicsuffixlist import PublicSuffixList

    psl = _psl()
    assert isinstance(psl, PublicSuffixList)
    domain = domain.lower().rstrip(".")
    return psl.privatesuffix(domain) or domain


def known_suffix(domain: str) -> bool:
    """Whether *domain* ends in a suffix of the Public Suffix List (or a reserved one): a domain, not ``file.txt``."""
    from publicsuffixlist import PublicSuffixList

    psl = _psl()
    assert isinstance(psl, PublicSuffixList)
    domain = domain.lower().rstrip(".")
    if domain.rsplit(".", 1)[-1] in _RESERVED:
        return True
    return psl.publicsuffix(domain, accept_unknown=False) is not None


def aligned(a: str, b: str, strict: bool = False) -> bool:
    """DMARC identifier alignment (RFC 7489 3.1): equal (strict) or the same organizational domain (relaxed)."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if strict:
        return a == b
    return org_domain(a) == org_domain(b)
