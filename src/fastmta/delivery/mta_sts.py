"""MTA-STS (RFC 8461): a domain's published demand that its mail go over verified TLS to listed MX hosts.

What a domain publishes, and how it is read here:

1. a TXT record at ``_mta-sts.DOMAIN``, exactly one starting ``v=STSv1``, whose
   ``id`` changes whenever the policy does (:func:`parse_record`);
2. the policy, at ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``: ``version``,
   ``mode`` (``enforce``, ``testing``, ``none``), ``mx`` patterns and
   ``max_age`` (:func:`parse_policy`). It is fetched with the certificate
   verified for that name, no redirect followed, at most 64 KiB of
   ``text/plain``, names resolved by the engine's own resolver (so ``[dns]
   nameservers`` is obeyed there too).

:class:`PolicyCache` keeps a fetched policy until its ``max_age``; it fetches
again when the TXT ``id`` changes, and, in the background while the cached
one still serves, once the policy is past half its life (RFC 8461 5.1). Neither a
missing record nor a failed fetch drops a policy still cached (RFC 8461 5.1:
an attacker on the path may remove both); with none cached, the domain is
mailed as if it had no policy, as the RFC says. With a durable queue the
policies are also kept beside it (:data:`POLICY_FILE`, rewritten whenever
one is fetched), so a restart does not open the window an attacker who
strips the record needs (RFC 8461 10.2: a first contact trusts DNS).

What a policy does to a route (``Router``, for routes from MX records only:
a static route is the operator's own choice) is :func:`mx_allowed` and the
site marker :data:`VERIFIED_SITE`, explained where they are used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from fastmta.delivery.dns import DnsResolver, DnsTemporaryError, Status

if TYPE_CHECKING:
    import aiohttp

    from fastmta.delivery.config import MtaStsConfig

__all__ = [
    "POLICY_FILE",
    "VERIFIED_SITE",
    "Policy",
    "PolicyCache",
    "PolicyError",
    "is_verified_site",
    "mx_allowed",
    "parse_policy",
    "parse_record",
    "verifying_context",
]

log = logging.getLogger("fastmta.delivery.mta_sts")

#: The last element of the name of a site whose connections must verify the MX host's certificate
#: (a domain under an ``enforce`` policy). Mail for such domains gets a site of its own, so that the
#: domains on the same MX hosts without a policy keep their opportunistic connections; the marker is
#: not a host name, so per-host limit patterns ("*.google.com") still match the site.
VERIFIED_SITE = "(mta-sts)"

#: Where a durable queue keeps the policies fetched (in its directory).
POLICY_FILE = "mta-sts.json"

MAX_POLICY = 64 * 1024  # RFC 8461 3.2: senders may refuse larger bodies
MAX_AGE = 31_557_600  # RFC 8461 3.2: at most a year
MODES = ("enforce", "testing", "none")
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_STS_RECORD = re.compile(r"v=STSv1[ \t]*;")
#: Policies fetched at once (beyond, a fetch waits before its timeout starts: a burst of new domains
#: at a restart must not time its own fetches out and mail them as without a policy).
MAX_FETCHES = 16


class PolicyError(ValueError):
    """A policy (or its fetch) that cannot be used; the text says why."""


@dataclass(frozen=True, slots=True)
class Policy:
    """A domain's MTA-STS policy as fetched."""

    domain: str
    id: str  # the TXT record's id it was fetched under
    mode: str  # enforce, testing, none
    mx: tuple[str, ...]  # patterns: "mx.example.com" or "*.example.com" (one label)
    max_age: int  # seconds


def is_verified_site(site: str) -> bool:
    """Is *site* one whose connections verify certificates under an MTA-STS policy?"""
    return site.endswith("," + VERIFIED_SITE)


def parse_record(texts: Sequence[str]) -> str | None:
    """The policy id of a domain's ``_mta-sts`` TXT records; None unless exactly one valid STS record."""
    records = [t for t in texts if _STS_RECORD.match(t)]  # others are discarded first (3.1)
    if len(records) != 1:
        return None  # RFC 8461 3.1: none, or several (a policy in transition): no policy
    fields: dict[str, str] = {}
    for part in records[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    policy_id = fields.get("id", "")
    return policy_id if fields.get("v") == "STSv1" and _ID.fullmatch(policy_id) else None


def parse_policy(domain: str, text: str, policy_id: str) -> Policy:
    """Read a policy body (RFC 8461 3.2); :class:`PolicyError` names what is wrong."""
    fields: dict[str, list[str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"line {n} is not 'key: value'")
        fields.setdefault(key.strip(), []).append(value.strip())
    version = (fields.get("version") or [""])[0]  # of a repeated key other than mx, the first counts (3.2)
    if version != "STSv1":
        raise PolicyError(f"version is {version!r}, not STSv1")
    mode = (fields.get("mode") or [""])[0]
    if mode not in MODES:
        raise PolicyError(f"mode {mode!r} is not enforce, testing or none")
    age = (fields.get("max_age") or [""])[0]
    if not (age.isascii() and age.isdigit()) or len(age) > 10:
        raise PolicyError(f"max_age {age!r} is not a number of seconds")
    mx = tuple(p.lower().rstrip(".") for p in fields.get("mx", []) if p)
    if not mx and mode != "none":
        raise PolicyError("no mx pattern")
    return Policy(domain, policy_id, mode, mx, min(int(age), MAX_AGE))


def mx_allowed(host: str, patterns: Sequence[str]) -> bool:
    """Does MX *host* match one of a policy's ``mx`` patterns? ``*.`` stands for exactly one label."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            suffix = pattern[1:]
            if host.endswith(suffix) and len(host) > len(suffix) and "." not in host[: -len(suffix)]:
                return True
        elif host == pattern:
            return True
    return False


class PolicyCache:
    """Each domain's policy: its TXT id looked up at every call, the body fetched when that id changes.

    A call comes once per domain per route lifetime (the router memoizes
    routes for their DNS TTL), so the TXT lookup is one DNS query per domain
    per TTL, itself cached by the resolver. A policy past half its life is
    fetched again in the background (one fetch per domain at a time), the
    cached one answering meanwhile: a policy server that is down never holds
    up a route that has a valid policy.
    """

    def __init__(
        self, config: MtaStsConfig, resolver: DnsResolver, *, ca_file: str = "", clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._resolver = resolver
        self._ca_file = ca_file
        self._clock = clock
        self._policies: dict[str, tuple[Policy, float]] = {}  # domain -> (policy, expires on *clock*)
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0  # policy bodies fetched (observability, tests)
        self._path: Path | None = None
        self._fetching = asyncio.Semaphore(MAX_FETCHES)
        self._refreshing: dict[str, asyncio.Task[Policy | None]] = {}  # background refreshes, by domain

    def keep_in(self, path: Path) -> None:
        """Load the policies kept in *path* (those not expired) and keep every new one there.

        All or nothing: a file that does not decode, entry by entry and type
        by type, is reported and none of it trusted (a policy read wrong would
        defer its domain's mail until it expired); the next fetches replace it.
        """
        self._path = path
        try:
            saved = msgspec.json.decode(path.read_bytes(), type=list[_SavedPolicy])
            for e in saved:
                if e.mode not in MODES:
                    raise ValueError(f"{e.domain}: mode {e.mode!r}")
        except FileNotFoundError:
            return
        except (OSError, ValueError, msgspec.DecodeError) as exc:  # msgspec's ValidationError is a DecodeError
            log.warning("MTA-STS policies in %s not read (fetched again as needed): %s", path, exc)
            return
        now = self._clock()
        self._policies.update({e.domain: (Policy(e.domain, e.id, e.mode, tuple(e.mx), e.max_age), e.expires)
                               for e in saved if e.expires > now})

    def _save(self) -> None:
        if self._path is None:
            return
        now = self._clock()
        entries = [_SavedPolicy(p.domain, p.id, p.mode, list(p.mx), p.max_age, expires)
                   for p, expires in self._policies.values() if expires > now]
        tmp = self._path.with_name(self._path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private, as the queue's files
            with os.fdopen(fd, "wb") as f:
                f.write(msgspec.json.encode(entries))
                f.flush()
                os.fsync(f.fileno())  # the rename must not outlive its content (a power cut: an empty file)
            os.replace(tmp, self._path)
        except OSError as exc:  # the policies stay in memory; only a restart would forget them
            log.warning("MTA-STS policies not saved to %s: %s", self._path, exc)

    async def aclose(self) -> None:
        for task in self._refreshing.values():
            task.cancel()
        if self._refreshing:
            await asyncio.gather(*self._refreshing.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def policy(self, domain: str) -> Policy | None:
        """The policy *domain* has now (None: none, or mode none)."""
        cached, expires = self._policies.get(domain, (None, 0.0))
        now = self._clock()
        if cached is not None and expires <= now:
            del self._policies[domain]
            cached = None
        try:
            answer = await self._resolver.txt("_mta-sts." + domain)
        except DnsTemporaryError as exc:
            log.info("MTA-STS record of %s not read (%s): %s", domain, exc.reason,
                     "the cached policy stands" if cached else "mailed as without a policy")
            return _active(cached)
        policy_id = parse_record(answer.texts) if answer.status is Status.FOUND else None
        if policy_id is None:
            return _active(cached)  # RFC 8461 5.1: a record gone does not end a cached policy
        if cached is not None and cached.id == policy_id:
            # Past half its life: fetched again under the same id (RFC 8461 5.1: refresh before it
            # expires, so a policy in force never lapses into the window before its next fetch).
            if expires - now < cached.max_age / 2 and domain not in self._refreshing:
                task = asyncio.ensure_future(self._renew(domain, policy_id, cached))
                self._refreshing[domain] = task
                task.add_done_callback(lambda _t: self._refreshing.pop(domain, None))
            return _active(cached)
        return _active(await self._renew(domain, policy_id, cached))

    async def _renew(self, domain: str, policy_id: str, cached: Policy | None) -> Policy | None:
        """Fetch *domain*'s policy under *policy_id* and keep it; on failure, *cached* stands."""
        try:
            policy = parse_policy(domain, await self._fetch(domain), policy_id)
        except PolicyError as exc:
            log.warning("MTA-STS policy of %s not used: %s (%s)", domain, exc,
                        "the cached one stands" if cached else "mailed as without a policy")
            return cached
        self._policies[domain] = (policy, self._clock() + policy.max_age)
        self._save()
        return policy

    async def _fetch(self, domain: str) -> str:
        import aiohttp

        port = self._config.https_port
        host = "mta-sts." + domain
        url = f"https://{host}{'' if port == 443 else f':{port}'}/.well-known/mta-sts.txt"
        if self._session is None:
            try:
                context = verifying_context(self._ca_file)
            except (OSError, ssl.SSLError) as exc:  # checked with the configuration; changed since?
                raise PolicyError(f"smtp.tls_ca_file {self._ca_file}: {exc}") from None
            connector = aiohttp.TCPConnector(resolver=_engine_dns(self._resolver), ssl=context, limit=MAX_FETCHES)
            self._session = aiohttp.ClientSession(connector=connector)
        self.fetches += 1
        async with self._fetching:
            try:
                async with self._session.get(url, allow_redirects=False,
                                             timeout=aiohttp.ClientTimeout(total=self._config.timeout)) as response:
                    if response.status != 200:
                        raise PolicyError(f"{url} answered HTTP {response.status}")
                    if response.content_type != "text/plain":
                        raise PolicyError(f"{url} is {response.content_type}, not text/plain")
                    body = bytearray()
                    # To its end (a short body is an error, not a policy: aiohttp raises), within the cap.
                    async for chunk in response.content.iter_chunked(16384):
                        body += chunk
                        if len(body) > MAX_POLICY:
                            raise PolicyError(f"{url} is over {MAX_POLICY} bytes")
            except PolicyError:
                raise
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                raise PolicyError(f"fetching {url} failed: {str(exc) or type(exc).__name__}") from None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"{url} is not UTF-8 text") from None


def verifying_context(ca_file: str = "") -> ssl.SSLContext:
    """A client context that verifies certificates: the system's CAs, and *ca_file*'s besides."""
    context = ssl.create_default_context()  # with cafile= it would load that file *instead* of the system's
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


class _SavedPolicy(msgspec.Struct, frozen=True):
    """One policy as kept in :data:`POLICY_FILE`."""

    domain: str
    id: str
    mode: str
    mx: list[str]
    max_age: int
    expires: float


def _active(policy: Policy | None) -> Policy | None:
    return policy if policy is not None and policy.mode != "none" else None


def _engine_dns(resolver: DnsResolver) -> aiohttp.abc.AbstractResolver:
    """aiohttp's resolver interface over the engine's resolver (made here: aiohttp loads only when a
    policy is fetched, not with every ``fastmta send``)."""
    from aiohttp.abc import AbstractResolver, ResolveResult

    class EngineDns(AbstractResolver):
        async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                          ) -> list[ResolveResult]:
            out: list[ResolveResult] = []
            failed: list[str] = []
            for version, af in ((4, socket.AF_INET), (6, socket.AF_INET6)):
                if family not in (socket.AF_UNSPEC, af):
                    continue
                try:
                    answer = await resolver.addresses(host, version)
                except DnsTemporaryError as exc:  # the other family may still answer, as in routing
                    failed.append(exc.reason)
                    continue
                out += [ResolveResult(hostname=host, host=a, port=port, family=af, proto=0,
                                      flags=socket.AI_NUMERICHOST) for a in answer.addresses]
            if not out:
                raise OSError(f"{host}: {'; '.join(failed) or 'no address'}")
            return out

        async def close(self) -> None:
            return None

    return EngineDns()
