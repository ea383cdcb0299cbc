"""DKIM signing (RFC 6376, RFC 8463): rsa-sha256 and ed25519-sha256.

Keys are parsed once at start-up into ``cryptography`` key objects and cached
per (domain, selector); every per-message step that is not the signature
itself (splitting the header, canonicalization, body hashing) runs in
``fastmta.message.core``. The signature comes from OpenSSL. dkimpy is not used here:
it re-parses the PEM key on every call and does RSA in pure Python; the test
suite uses it as the independent verifier.

Configuration (one ``DkimKeyConfig`` per signature; two for the same domain
give a dual RSA + Ed25519 signature)::

    [[dkim]]
    domain = "example.com"
    selector = "s2024"
    key_path = "/etc/fastmta/dkim/s2024.pem"
    algorithm = "rsa-sha256"              # or "ed25519-sha256"
    canonicalization = "relaxed/relaxed"  # header/body: simple or relaxed each
    # headers = ["from", "to", ...]       # default: DEFAULT_SIGNED_HEADERS
    # oversign = ["from"]                 # listed once more than present

Key files: PEM (PKCS#8 or traditional) for both algorithms; for Ed25519 also
the base64 32-byte seed that dkimpy's ``dknewkey`` writes. A missing,
unreadable, malformed or mismatched key, or an RSA key under 1024 bits, is a
``ConfigError`` naming the file, raised by ``load_signing_key``: at start-up,
never per message. rsa-sha1 cannot be configured. ``l=`` is never emitted
(a body length limit lets anyone append content under the signature).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, cast

import msgspec
import nacl.bindings
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from fastmta.errors import ConfigError
from fastmta.message import core

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
Canonicalization = Literal["simple/simple", "simple/relaxed", "relaxed/simple", "relaxed/relaxed", "simple", "relaxed"]

DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "reply-to",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
    "x-fastmta-ref",  # the trace that maps a complaint (ARF carries headers) back to its recipient
)
MIN_RSA_BITS = 1024
_PKCS1V15 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


class DkimKeyConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One DKIM signing identity as named in the configuration."""

    domain: str
    selector: str
    key_path: str
    algorithm: Algorithm = "rsa-sha256"
    canonicalization: Canonicalization = "relaxed/relaxed"
    headers: tuple[str, ...] = DEFAULT_SIGNED_HEADERS
    # Headers listed once more than they occur, so nobody can add one later
    # (a second From would otherwise be shown unsigned by some readers).
    oversign: tuple[str, ...] = ("from",)


@dataclass(frozen=True)
class SigningKey:
    """A loaded, validated key with everything per-message signing needs precomputed."""

    domain: str
    selector: str
    algorithm: Algorithm
    header_relaxed: bool
    body_relaxed: bool
    headers: tuple[bytes, ...]  # lower-case names, in h= order
    oversign: frozenset[bytes]
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = field(repr=False)

    @cached_property
    def tag_prefix(self) -> str:
        """The constant start of this key's DKIM-Signature field."""
        return (
            f"DKIM-Signature: v=1; a={self.algorithm}; c={self.canonicalization};\r\n"
            f" d={self.domain}; s={self.selector};"
        )

    @property
    def canonicalization(self) -> str:
        return f"{'relaxed' if self.header_relaxed else 'simple'}/{'relaxed' if self.body_relaxed else 'simple'}"

    @cached_property
    def _sodium_secret(self) -> bytes:
        """The Ed25519 key in libsodium's form (seed + public key, 64 bytes)."""
        seed = cast(ed25519.Ed25519PrivateKey, self.private_key).private_bytes_raw()
        return nacl.bindings.crypto_sign_seed_keypair(seed)[1]

    def sign_raw(self, data: bytes) -> bytes:
        """The signature over canonicalized header *data* (RFC 6376 3.7, RFC 8463 3)."""
        # A string test, not isinstance: the key classes are ABCs, whose
        # isinstance costs more than the rest of this method's Python.
        if self.algorithm == "rsa-sha256":
            return cast(rsa.RSAPrivateKey, self.private_key).sign(data, _PKCS1V15, _SHA256)
        # ed25519-sha256 signs the SHA-256 digest of the data (RFC 8463 3).
        # Through libsodium rather than OpenSSL: the same signature (Ed25519 is
        # deterministic; a test checks the two agree) in 14 us instead of 20 on
        # the bench machine, two thirds of the cost of signing a message.
        # crypto_sign returns the signature followed by the message.
        return nacl.bindings.crypto_sign(hashlib.sha256(data).digest(), self._sodium_secret)[:64]


def _parse_canonicalization(value: str, where: str) -> tuple[bool, bool]:
    parts = value.split("/")
    if len(parts) == 1:
        parts.append("simple")  # RFC 6376 3.5: "c=relaxed" means relaxed/simple
    if len(parts) != 2 or any(p not in ("simple", "relaxed") for p in parts):
        raise ConfigError(f"{where}: canonicalization {value!r} is not simple|relaxed[/simple|relaxed]")
    return parts[0] == "relaxed", parts[1] == "relaxed"


def _read_private_key(path: str, where: str) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{where}: key file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{where}: key file {path} is unreadable: {exc.strerror or exc}") from None
    if b"-----BEGIN" in raw:
        try:
            key = serialization.load_pem_private_key(raw, password=None)
        except TypeError:
            raise ConfigError(f"{where}: key file {path} is encrypted; fastmta needs an unencrypted key") from None
        except ValueError as exc:
            raise ConfigError(f"{where}: key file {path} is not a valid PEM private key ({exc})") from None
        if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
            raise ConfigError(f"{where}: key file {path} holds a {type(key).__name__}, not an RSA or Ed25519 key")
        return key
    # dkimpy/dknewkey store an Ed25519 private key as its base64 32-byte seed.
    try:
        seed = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32:
        raise ConfigError(f"{where}: key file {path} is neither PEM nor a base64 Ed25519 seed")
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def load_signing_key(config: DkimKeyConfig, *, source: str | None = None) -> SigningKey:
    """Read, parse and validate one key; every problem is a ConfigError naming the file.

    *source* names the configuration file that listed the key, for messages.
    """
    where = f"{source}: " if source else ""
    where += f"dkim {config.selector}._domainkey.{config.domain}"
    if config.algorithm not in ("rsa-sha256", "ed25519-sha256"):
        raise ConfigError(f"{where}: algorithm {config.algorithm!r} is not rsa-sha256 or ed25519-sha256")
    if not config.domain or not config.selector:
        raise ConfigError(f"{where}: domain and selector must not be empty")
    header_relaxed, body_relaxed = _parse_canonicalization(config.canonicalization, where)
    key = _read_private_key(config.key_path, where)
    if config.algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"{where}: key file {config.key_path} is not an RSA key but algorithm is rsa-sha256")
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(
                f"{where}: key file {config.key_path} is a {key.key_size}-bit RSA key; "
                f"at least {MIN_RSA_BITS} bits are required (RFC 8301)"
            )
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{where}: key file {config.key_path} is not an Ed25519 key but algorithm is ed25519-sha256")
    names = tuple(h.strip().lower().encode("ascii") for h in config.headers if h.strip())
    if b"from" not in names:
        raise ConfigError(f"{where}: the signed header list must include From (RFC 6376 5.4)")
    if any(b":" in n or b";" in n or b" " in n for n in names):
        raise ConfigError(f"{where}: invalid header name in {list(config.headers)}")
    return SigningKey(
        domain=config.domain,
        selector=config.selector,
        algorithm=config.algorithm,
        header_relaxed=header_relaxed,
        body_relaxed=body_relaxed,
        headers=tuple(dict.fromkeys(names)),
        oversign=frozenset(h.strip().lower().encode("ascii") for h in config.oversign),
        private_key=key,
    )


class KeyCache:
    """Keys parsed once, cached per (domain, selector)."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], SigningKey] = {}

    def load(self, config: DkimKeyConfig, *, source: str | None = None) -> SigningKey:
        ident = (config.domain.lower(), config.selector)
        key = self._keys.get(ident)
        if key is None:
            key = self._keys[ident] = load_signing_key(config, source=source)
        return key

    def get(self, domain: str, selector: str) -> SigningKey | None:
        return self._keys.get((domain.lower(), selector))

    def __len__(self) -> int:
        return len(self._keys)


# ----------------------------------------------------------------- signing


def _fold_b64(sig: str) -> str:
    # b= may be folded anywhere: verifiers delete its value with all
    # surrounding whitespace (RFC 6376 3.5), so keep lines short.
    if len(sig) <= 144:  # Ed25519 (88 characters): skip the generator, it is the hot case
        return sig if len(sig) <= 72 else sig[:72] + "\r\n " + sig[72:]
    return "\r\n ".join(sig[i : i + 72] for i in range(0, len(sig), 72))


def _format_tags(tags: Sequence[tuple[str, str]]) -> str:
    """``DKIM-Signature: k=v; k=v; ...`` folded at tag boundaries near 76 columns."""
    out = "DKIM-Signature:"
    line = len(out)
    for i, (k, v) in enumerate(tags):
        piece = f"{k}={v}" + (";" if i < len(tags) - 1 else "")
        if line + 1 + len(piece) > 76 and line > 1:
            out += "\r\n " + piece
            line = 1 + len(piece)
        else:
            out += " " + piece
            line += 1 + len(piece)
    return out


def body_hash(chunks: Iterable[bytes], relaxed: bool) -> str:
    """The base64 bh= value of a body given in chunks (e.g. read from a spool file).

    ``core.BodyCanonicalizer`` carries state across chunk boundaries (a CRLF
    split in two, a WSP run, held-back empty lines), so any split gives the
    same hash as the whole body.
    """
    canon = core.BodyCanonicalizer(relaxed)
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(canon.feed(chunk))
    h.update(canon.finish())
    return base64.b64encode(h.digest()).decode("ascii")


class _Parsed:
    """A message split once for any number of signatures."""

    __slots__ = ("body", "body_hashes", "by_name")

    def __init__(self, message: bytes) -> None:
        fields, offset = core.split_header_fields(message)
        self.by_name = core.index_header_fields(fields)
        self.body = message[offset:]
        self.body_hashes: dict[bool, str] = {}

    def body_hash(self, relaxed: bool) -> str:
        bh = self.body_hashes.get(relaxed)
        if bh is None:
            # One call each, both without the GIL: streaming a large body in
            # chunks saved a transient copy, but released and took the GIL back
            # twice a chunk, and signing threads then queued for it.
            digest = hashlib.sha256(core.canonicalize_body(self.body, relaxed)).digest()
            bh = base64.b64encode(digest).decode("ascii")
            self.body_hashes[relaxed] = bh
        return bh

    def header_data(self, names: Iterable[bytes], relaxed: bool) -> bytes:
        """Canonical header fields for h= *names*: instances from the bottom up (RFC 6376 5.4.2)."""
        used: dict[bytes, int] = {}
        out = []
        for name in names:
            instances = self.by_name.get(name)
            k = used.get(name, 0)
            used[name] = k + 1
            if instances and k < len(instances):
                out.append(core.canonicalize_header(instances[-1 - k], relaxed))
            # else: a listed but absent header signs as the null string
        return b"".join(out)


def _finish(key: SigningKey, header_data: bytes, unsigned: str) -> bytes:
    """Sign header data + the canonical unsigned DKIM-Signature field; return the full field."""
    # The signature field itself, b= empty, canonicalized, without its CRLF.
    data = header_data + core.canonicalize_header(unsigned.encode("ascii"), key.header_relaxed)[:-2]
    sig = base64.b64encode(key.sign_raw(data)).decode("ascii")
    return (unsigned + _fold_b64(sig) + "\r\n").encode("ascii")


def _signature_field(parsed: _Parsed, key: SigningKey, tags: Sequence[tuple[str, str]]) -> bytes:
    """Compute bh= and b= for *tags* (h= taken verbatim) and return the header field."""
    values = dict(tags)
    names = [n.strip().lower().encode("ascii") for n in values["h"].split(":")]
    filled = [(k, parsed.body_hash(key.body_relaxed) if k == "bh" else v) for k, v in tags if k != "b"]
    filled.append(("b", ""))
    return _finish(key, parsed.header_data(names, key.header_relaxed), _format_tags(filled))


def _fold_h(names: list[bytes]) -> str:
    """The h= value, folded after a colon when a line would pass ~76 columns."""
    out = ""
    line = 4  # " h="
    for i, n in enumerate(names):
        piece = n.decode("ascii") + (":" if i < len(names) - 1 else "")
        if line + len(piece) > 76:
            out += "\r\n "
            line = 1
        out += piece
        line += len(piece)
    return out


def sign_tags(message: bytes, key: SigningKey, tags: Sequence[tuple[str, str]]) -> bytes:
    """Low level: the DKIM-Signature field for exactly these tags, in this order.

    ``h=`` is used verbatim (its names choose the fields); ``bh=`` is computed
    wherever it appears and ``b=`` is appended last. Use ``DkimSigner`` for
    normal signing; this exists to reproduce published signatures.
    """
    return _signature_field(_Parsed(message), key, tags)


def _needs_crlf_fix(message: bytes) -> bool:
    crlf = message.count(b"\r\n")
    return message.count(b"\n") != crlf or message.count(b"\r") != crlf


class DkimSigner:
    """Signs messages with one or more keys (several = one signature each, e.g. RSA + Ed25519).

    Safe to call from several threads at once (``fastmta send`` signs RSA
    campaigns in a thread pool): its caches are replaced whole, never half-written.
    """

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        if not keys:
            raise ConfigError("DkimSigner needs at least one key")
        self.keys = tuple(keys)
        self._simple_headers = any(not k.header_relaxed for k in self.keys)
        self._h_cache: dict[tuple[bytes, ...], str] = {}
        # One tuple, so that threads signing at once never pair a second with another's text.
        self._t: tuple[int, str] = (-1, "")
        #: An RSA signature costs ~0.7-1 ms (Ed25519: ~0.03): worth doing on another core.
        self.costly = any(k.algorithm == "rsa-sha256" for k in self.keys)

    def signature_fields(self, message: bytes, *, timestamp: int | None = None) -> bytes:
        """The DKIM-Signature fields (CRLF-terminated) to put on top of *message*.

        *message* is the CRLF message as it will be sent (before dot-stuffing).
        Lone CR or LF are signed as the CRLF ``to_wire`` turns them into.
        """
        parsed = _Parsed(message)
        if self._simple_headers and _needs_crlf_fix(message[: len(message) - len(parsed.body)]):
            # Only simple header canonicalization sees line ends inside
            # fields; the body canonicalizer already treats lone CR/LF as CRLF.
            parsed = _Parsed(core.normalize_crlf(message))
        if timestamp is None:
            now = int(time.time())
            second, t = self._t
            if now != second:
                t = str(now)
                self._t = (now, t)
        else:
            t = str(timestamp)
        by_name = parsed.by_name
        out = []
        for key in self.keys:
            data, h = core.select_headers(by_name, key.headers, key.oversign, key.header_relaxed)
            # A campaign's messages share one header set: fold h= once.
            hkey = tuple(h)
            folded = self._h_cache.get(hkey)
            if folded is None:
                if len(self._h_cache) > 1024:
                    self._h_cache.clear()
                folded = self._h_cache[hkey] = _fold_h(h)
            unsigned = (
                f"{key.tag_prefix} t={t};\r\n h={folded};\r\n"
                f" bh={parsed.body_hash(key.body_relaxed)};\r\n b="
            )
            out.append(_finish(key, data, unsigned))
        # The last key's field goes on top; order is irrelevant to verifiers.
        return b"".join(reversed(out))

    def sign(self, message: bytes, *, timestamp: int | None = None) -> bytes:
        """*message* with its DKIM-Signature fields prepended."""
        return self.signature_fields(message, timestamp=timestamp) + message
