"""Who may inject: SMTP AUTH accounts (scrypt hashes), API tokens (SHA-256), relay networks.

Passwords are stored as scrypt hashes (``hashlib.scrypt``, memory-hard, in
the standard library: no extra dependency) in the format
``scrypt$N$r$p$<salt base64>$<key base64>``. Checking one costs tens of
milliseconds on purpose, so it runs in a worker thread, never on the event
loop. API tokens are long random strings, not passwords, so a SHA-256 of
each is enough to keep them out of the configuration file, and it is cheap
enough to check on every request (in constant time).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import hmac
import ipaddress
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

__all__ = ["Accounts", "LoginGuard", "RelayPolicy", "TokenRing", "hash_password", "verify_password"]

#: scrypt cost: N=2^15, r=8 takes ~32 MiB and ~60 ms here; OWASP's minimum is N=2^17 at r=8,p=1
#: for interactive logins, but an MTA checks AUTH once per connection of a busy client.
_N, _R, _P = 2**15, 8, 1


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=32)
    return f"scrypt${n}${r}${p}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, key_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, key = base64.b64decode(salt_b64, validate=True), base64.b64decode(key_b64, validate=True)
        got = hashlib.scrypt(
            password.encode("utf-8", "surrogateescape"), salt=salt, n=int(n), r=int(r), p=int(p),
            maxmem=256 * 1024 * 1024, dklen=len(key),
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, key)


#: scrypt runs on threads of its own, two at most: a crowd of failing logins waits its turn there and
#: never takes the shared worker threads (the writes of mail for the receive domains, the journal's).
_CHECKS = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="fastmta-auth")


class LoginGuard:
    """Failed logins by client address: past *limit* in *window* seconds, that address's AUTH is refused
    unchecked for the rest of the window (each check is 32 MiB and ~60 ms of scrypt: 40 clients failing
    three times each took 8 s of CPU; Postfix's anvil limits AUTH rates per client the same way)."""

    def __init__(self, limit: int = 10, window: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def refused(self, ip: str) -> bool:
        now = self._clock()
        times = [t for t in self._failures.get(_client(ip), ()) if now - t < self.window]
        return len(times) >= self.limit

    def failed(self, ip: str) -> None:
        now, key = self._clock(), _client(ip)
        times = [t for t in self._failures.pop(key, ()) if now - t < self.window][-self.limit:]
        self._failures[key] = [*times, now]
        while len(self._failures) > 10_000:  # bounded: the oldest addresses go first
            self._failures.popitem(last=False)


def _client(ip: str) -> str:
    """The client an address stands for: an IPv6 one's /64 (one host has them all, and an attacker rotating
    through it was never counted twice)."""
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return ip
    return str(ipaddress.ip_network(f"{addr}/64", strict=False)) if addr.version == 6 else str(addr)


class Accounts:
    """SMTP AUTH accounts: name -> scrypt hash."""

    def __init__(self, users: Iterable[tuple[str, str]]) -> None:
        self._hashes = dict(users)
        # A name that does not exist still costs one scrypt, so timing does not tell which names exist.
        self._decoy = hash_password(os.urandom(8).hex(), n=_N)
        self.guard = LoginGuard()

    def __bool__(self) -> bool:
        return bool(self._hashes)

    async def verify(self, name: str, password: str) -> bool:
        stored = self._hashes.get(name)
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(_CHECKS, verify_password, password, stored or self._decoy)
        return ok and stored is not None


class TokenRing:
    """Bearer tokens by their SHA-256: token -> the client's name."""

    def __init__(self, tokens: Iterable[tuple[str, str]]) -> None:
        self._by_digest = {bytes.fromhex(digest): name for name, digest in tokens}

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def principal(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        # A dict lookup on the digest: the digest of a guess reveals nothing
        # about the stored ones, so the lookup's timing cannot be used to
        # guess a token byte by byte.
        return self._by_digest.get(digest)


class RelayPolicy:
    """Who may send where: Postfix's mynetworks + relay_domains, and SMTP AUTH.

    A client in a relay network, or authenticated, may send anywhere. Any
    other client may only send to the domains this service receives mail
    for (bounces, complaints, unsubscribes); anything else is refused with
    550 5.7.1: fastmta is never an open relay.
    """

    def __init__(self, networks: Iterable[str], receive_domains: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self.receive_domains = frozenset(d.lower().rstrip(".") for d in receive_domains if d)

    def trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.partition("%")[0])
        except ValueError:
            return False  # a unix socket peer or garbage: not trusted
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

    def receives(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.receive_domains
