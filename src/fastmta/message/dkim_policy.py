"""DKIM signing for all mail: which key signs a message is chosen by its From domain.

Campaign jobs name their own keys (``fastmta.intake.campaign``); everything
else — pickup files, ``engine.submit``, injection into ``fastmta serve`` — is
signed by the policy in the main configuration::

    [[dkim]]
    domain = "example.com"                 # d=
    selector = "rsa2026"                   # s=
    key_file = "dkim/rsa2026.pem"          # relative to the configuration file
    from_domains = ["*.example.com", "example.net"]   # more From domains signed with this key

    [[dkim]]                               # a second entry for the same domain: both sign
    domain = "example.com"                 # (RSA + Ed25519, as Gmail recommends)
    selector = "ed2026"
    key_file = "dkim/ed2026.pem"
    # algorithm = "ed25519-sha256"         # default: from the key
    # headers = [...]                      # default: the campaigns' list (DEFAULT_SIGNED_HEADERS)
    # canonicalization = "relaxed/relaxed"; oversign = ["from"]

A message is signed by the entries that match the domain of its RFC 5322
From (never the envelope sender): an entry matches when its ``domain`` or
one of its ``from_domains`` equals the From domain, or a ``*.parent``
pattern in ``from_domains`` covers it (subdomains only, not ``parent``
itself). The most specific match wins: exact entries, else the wildcard
with the longest parent; all entries at that level sign (dual signing). An
entry is skipped when the message already carries a DKIM-Signature with its
d= and s= (a campaign signed it). A message with no From, several From
fields, several From domains or a From that cannot be parsed is not signed,
and :meth:`DkimPolicy.sign_result` says why.

Keys are read once, by :meth:`DkimPolicy.from_config`; per message there is
one header split for the From lookup (cached per From field) and the
signing itself (``DkimSigner``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import msgspec
from cryptography.hazmat.primitives.asymmetric import rsa

from fastmta.errors import ConfigError
from fastmta.message import core, downgrade
from fastmta.message.dkim import (
    DEFAULT_SIGNED_HEADERS,
    MIN_RSA_BITS,
    Algorithm,
    Canonicalization,
    DkimKeyConfig,
    DkimSigner,
    SigningKey,
    _read_private_key,
    load_signing_key,
)

__all__ = ["DkimEntry", "DkimPolicy", "SignResult", "from_domain"]


class DkimEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One ``[[dkim]]`` entry of the main configuration."""

    domain: str
    selector: str
    key_file: str
    #: Default: the key's type (an RSA key signs rsa-sha256, an Ed25519 key ed25519-sha256).
    algorithm: Algorithm | None = None
    canonicalization: Canonicalization = "relaxed/relaxed"
    headers: tuple[str, ...] = DEFAULT_SIGNED_HEADERS
    oversign: tuple[str, ...] = ("from",)
    #: Further From domains this key signs: ``sub.example.com`` exactly, or
    #: ``*.example.com`` for every subdomain of example.com.
    from_domains: tuple[str, ...] = ()


class SignResult(NamedTuple):
    """What :meth:`DkimPolicy.sign_result` did."""

    message: bytes  # the message, with its new DKIM-Signature fields on top
    signed: int  # signatures added
    reason: str | None  # why nothing (or not every matching key) signed; None otherwise


_SELECTOR = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?$")
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def _normalize_domain(name: str) -> str:
    """Lower-case A-label form without the trailing dot; ValueError when not a domain name."""
    name = name.strip().rstrip(".")
    if not name.isascii():
        import idna  # only for internationalized names

        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(f"not a valid internationalized domain name: {name!r} ({exc})") from None
    name = name.lower()
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"not a valid domain name: {name!r}")
    return name


# ------------------------------------------------------------ the From domain


def _strip_comments(value: str) -> str | None:
    """*value* with its comments (nested parentheses) replaced by a space; None when unbalanced."""
    if "(" not in value and ")" not in value:
        return value
    out: list[str] = []
    depth = 0
    quoted = False
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c == "\\" and (quoted or depth):
            if depth == 0:
                out.append(value[i : i + 2])
            i += 2
            continue
        if depth:
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth == 0:
                    out.append(" ")
        elif quoted:
            out.append(c)
            if c == '"':
                quoted = False
        elif c == '"':
            quoted = True
            out.append(c)
        elif c == "(":
            depth = 1
        elif c == ")":
            return None
        else:
            out.append(c)
        i += 1
    return None if depth or quoted else "".join(out)


def _mailboxes(value: str) -> list[str] | None:
    """The addr-specs of a comment-free mailbox list; None when it is not one."""
    addrs: list[str] = []
    current: list[str] = []  # characters of the mailbox being read, outside angle brackets
    angle: list[str] | None = None  # inside <...>
    angles: list[str] = []  # the angle-addrs of the current mailbox
    quoted = False
    i = 0
    n = len(value)

    def close() -> bool:
        if len(angles) > 1:
            return False  # two <...> in one mailbox
        text = "".join(current).strip()
        if angles:
            addrs.append(angles[0].strip())
        elif text:
            addrs.append(text)
        # else an empty element ("a@x,,b@x", RFC 5322 4.4): nothing to add
        current.clear()
        angles.clear()
        return True

    while i < n:
        c = value[i]
        sink = current if angle is None else angle
        if c == "\\" and quoted:
            sink.append(value[i : i + 2])
            i += 2
            continue
        if quoted:
            sink.append(c)
            quoted = c != '"'
        elif c == '"':
            sink.append(c)
            quoted = True
        elif angle is not None:
            if c == ">":
                angles.append("".join(angle))
                angle = None
            elif c == "<":
                return None
            else:
                angle.append(c)
        elif c == "<":
            angle = []
        elif c == ">" or c in ":;":  # a stray bracket, or a group (RFC 6854): not a mailbox list
            return None
        elif c == ",":
            if not close():
                return None
        else:
            current.append(c)
        i += 1
    if quoted or angle is not None or not close():
        return None
    return addrs


def from_domain(field: bytes) -> tuple[str | None, str | None]:
    """The domain of one From header field (``From: ...`` with its folds), or why there is none.

    Returns ``(domain, None)`` with the domain in lower-case A-label form,
    or ``(None, reason)``. Display names (quoted, plain or RFC 2047
    encoded-words), comments, folding and raw UTF-8 (RFC 6532) are handled;
    a mailbox list whose addresses share one domain gives that domain.
    """
    value = field.split(b":", 1)[1] if b":" in field else b""
    text = value.decode("utf-8", "replace").replace("\r", "").replace("\n", "")
    stripped = _strip_comments(text)
    addrs = _mailboxes(stripped) if stripped is not None else None
    if not addrs:
        return None, "the From field holds no parsable address"
    domains: set[str] = set()
    for addr in addrs:
        if "@" not in addr:
            return None, f"the From address {addr!r} has no domain"
        part = addr.rsplit("@", 1)[1].strip()
        if part.startswith("["):
            return None, f"the From address {addr!r} has an address literal, not a domain"
        try:
            domains.add(_normalize_domain(part))
        except ValueError:
            return None, f"the From address {addr!r} has an invalid domain"
    if len(domains) > 1:
        return None, f"the From field names several domains ({', '.join(sorted(domains))})"
    return domains.pop(), None


# -------------------------------------------------------------- the policy


class _Entry(NamedTuple):
    key: SigningKey
    domain: str  # normalized d=
    selector: str  # lower-case, for the already-signed test
    exact: frozenset[str]  # From domains signed exactly
    parents: tuple[str, ...]  # ".example.com": its subdomains


def _load_entry(i: int, entry: DkimEntry) -> _Entry:
    where = f"dkim[{i}]"
    try:
        domain = _normalize_domain(entry.domain)
    except ValueError as exc:
        raise ConfigError(f"{where}.domain: {exc}") from None
    if not _SELECTOR.match(entry.selector) or ".." in entry.selector:
        raise ConfigError(f"{where}.selector: {entry.selector!r} is not a valid selector (letters, digits, '-', '_', '.')")
    exact: set[str] = {domain}
    parents: list[str] = []
    for pattern in entry.from_domains:
        p = pattern.strip()
        wildcard = p.startswith("*.")
        try:
            name = _normalize_domain(p[2:] if wildcard else p)
        except ValueError as exc:
            raise ConfigError(f"{where}.from_domains: {pattern!r}: {exc} (use 'domain' or '*.domain')") from None
        if wildcard:
            parents.append("." + name)
        else:
            exact.add(name)
    # Missing, unreadable, encrypted or foreign key files are named with the entry.
    private = _read_private_key(entry.key_file, f"{where}.key_file")
    kind: Algorithm = "rsa-sha256" if isinstance(private, rsa.RSAPrivateKey) else "ed25519-sha256"
    if entry.algorithm is not None and entry.algorithm != kind:
        raise ConfigError(f"{where}.algorithm: {entry.algorithm} but {entry.key_file} holds an {kind.split('-')[0]} key")
    if isinstance(private, rsa.RSAPrivateKey) and private.key_size < MIN_RSA_BITS:
        raise ConfigError(
            f"{where}.key_file: {entry.key_file} is a {private.key_size}-bit RSA key; "
            f"at least {MIN_RSA_BITS} bits are required (RFC 8301)"
        )
    config = DkimKeyConfig(
        domain=domain,
        selector=entry.selector,
        key_path=entry.key_file,
        algorithm=kind,
        canonicalization=entry.canonicalization,
        headers=entry.headers,
        oversign=entry.oversign,
    )
    key = load_signing_key(config, source=where)  # errors left: canonicalization, the header list
    return _Entry(key, domain, entry.selector.lower(), frozenset(exact), tuple(parents))


_CACHE_LIMIT = 4096
_NO_FROM = "the message has no From field"


class DkimPolicy:
    """The ``[[dkim]]`` entries, loaded: sign any message by its From domain.

    Build one per configuration (``Config.dkim_policy()``); a reload builds a
    new one. ``empty`` is true when there are no entries: then skip the call.
    Not thread-safe (its caches are plain dicts); one per event loop.
    """

    def __init__(self, entries: Sequence[_Entry] = ()) -> None:
        self._entries = tuple(entries)
        self.empty = not self._entries
        self._by_from: dict[bytes, tuple[str | None, str | None]] = {}  # From field -> (domain, reason)
        self._by_domain: dict[str, tuple[int, ...]] = {}  # From domain -> entries that sign it
        self._signers: dict[tuple[int, ...], DkimSigner] = {}

    @classmethod
    def from_config(cls, entries: Sequence[DkimEntry]) -> DkimPolicy:
        """Load every entry's key; a problem is a ConfigError naming the entry (``dkim[1].key_file: ...``)."""
        loaded: list[_Entry] = []
        seen: dict[tuple[str, str], int] = {}
        for i, entry in enumerate(entries):
            e = _load_entry(i, entry)
            ident = (e.domain, e.selector)
            if ident in seen:
                raise ConfigError(
                    f"dkim[{i}].selector: {entry.selector}._domainkey.{e.domain} is already dkim[{seen[ident]}]"
                )
            seen[ident] = i
            loaded.append(e)
        return cls(loaded)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def keys(self) -> tuple[SigningKey, ...]:
        return tuple(e.key for e in self._entries)

    def entries_for(self, domain: str) -> tuple[int, ...]:
        """Indexes of the entries that sign mail From *domain* (normalized): the most specific match."""
        chosen = self._by_domain.get(domain)
        if chosen is None:
            exact = tuple(i for i, e in enumerate(self._entries) if domain in e.exact)
            if exact:
                chosen = exact
            else:
                best = 0
                matches: list[int] = []
                for i, e in enumerate(self._entries):
                    length = max((len(p) for p in e.parents if domain.endswith(p)), default=0)
                    if length > best:
                        best, matches = length, [i]
                    elif length and length == best:
                        matches.append(i)
                chosen = tuple(matches)
            if len(self._by_domain) >= _CACHE_LIMIT:
                self._by_domain.clear()
            self._by_domain[domain] = chosen
        return chosen

    def _signer(self, chosen: tuple[int, ...]) -> DkimSigner:
        signer = self._signers.get(chosen)
        if signer is None:
            # Few distinct sets (one per matching level and skip pattern): no bound needed.
            signer = self._signers[chosen] = DkimSigner([self._entries[i].key for i in chosen])
        return signer

    def _domain_of(self, fields: list[bytes] | None) -> tuple[str | None, str | None]:
        if not fields:
            return None, _NO_FROM
        if len(fields) > 1:
            return None, f"the message has {len(fields)} From fields"
        field = fields[0]
        found = self._by_from.get(field)
        if found is None:
            found = from_domain(field)
            if len(self._by_from) >= _CACHE_LIMIT:
                self._by_from.clear()
            self._by_from[field] = found
        return found

    def sign_result(self, message: bytes, *, timestamp: int | None = None) -> SignResult:
        """Sign *message* with the keys for its From domain; say why not when none applies."""
        if self.empty:
            return SignResult(message, 0, "no [[dkim]] entries")
        header, _ = core.split_header_fields(message)
        by_name = core.index_header_fields(header)
        domain, reason = self._domain_of(by_name.get(b"from"))
        if domain is None:
            return SignResult(message, 0, reason)
        chosen = self.entries_for(domain)
        if not chosen:
            return SignResult(message, 0, f"no [[dkim]] entry signs From domain {domain}")
        existing = by_name.get(b"dkim-signature")
        skipped: list[str] = []
        if existing:
            present = _signed_by(existing)
            keep = []
            for i in chosen:
                e = self._entries[i]
                if (e.domain, e.selector) in present:
                    skipped.append(f"d={e.domain} s={e.key.selector}")
                else:
                    keep.append(i)
            chosen = tuple(keep)
            if not chosen:
                return SignResult(message, 0, f"already signed by {', '.join(skipped)}")
        if not existing and downgrade.body_is_8bit(message):
            # RFC 6376 5.3: sign the 7-bit form, so that no server without 8BITMIME on the way (whose
            # client must then convert, RFC 6152) can break the signature. Meaning kept; a message
            # someone else signed already keeps its octets (their signature covers them).
            message = downgrade.seven_bit(message)
        signed = self._signer(chosen).sign(message, timestamp=timestamp)
        return SignResult(signed, len(chosen), f"already signed by {', '.join(skipped)}" if skipped else None)

    def sign(self, message: bytes, *, timestamp: int | None = None) -> bytes:
        """*message* with DKIM-Signature fields for its From domain prepended (unchanged when none applies)."""
        if self.empty:
            return message
        return self.sign_result(message, timestamp=timestamp).message


# A tag is "name = value" after the field's colon or a ";" (RFC 6376 3.2); no
# tag value (base64, h=, z= quoted-printable) holds a raw ";".
_D_TAG = re.compile(rb";\s*d\s*=([^;]*)")
_S_TAG = re.compile(rb";\s*s\s*=([^;]*)")


def _signed_by(fields: list[bytes]) -> set[tuple[str, str]]:
    """The (d=, s=) pairs of existing DKIM-Signature fields, lower-case."""
    pairs: set[tuple[str, str]] = set()
    for field in fields:
        value = b";" + field.partition(b":")[2]
        d, s = _D_TAG.search(value), _S_TAG.search(value)
        if d is not None and s is not None:
            domain = b"".join(d.group(1).split()).decode("ascii", "replace").lower().rstrip(".")
            pairs.add((domain, b"".join(s.group(1).split()).decode("ascii", "replace").lower()))
    return pairs
