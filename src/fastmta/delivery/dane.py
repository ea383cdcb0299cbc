"""DANE for SMTP (RFC 7672): the MX host's certificate checked against its DNSSEC-signed TLSA records.

Sans-IO: TLSA records and the certificates a server presented in, a verdict out. Routing
(:mod:`fastmta.delivery.routing`) decides which hosts DANE applies to, from what the resolver says
it validated; the site queue makes STARTTLS mandatory for them and hands :func:`check` to the
connection, which runs it after the handshake and before any mail goes.

Which records count (RFC 7672 3.1): DANE-EE(3) and DANE-TA(2), with selector Cert(0) or SPKI(1)
and matching type Full(0), SHA2-256(1) or SHA2-512(2). PKIX-TA(0) and PKIX-EE(1) are unusable for
SMTP: no CA is trusted by default between MTAs. A host whose TLSA records are all unusable still
gets mandatory TLS (2.2: "encrypt"), verified only as its site asks (``tls_verify``, MTA-STS).

* DANE-EE: the leaf certificate (or its public key) matches; its names and dates do not matter
  (3.1.1): the DNS says which key is the server's.
* DANE-TA: a certificate of the chain the server sent (or the one the record carries whole)
  matches, the leaf is signed through the chain up to it by CAs allowed to sign (basicConstraints,
  keyUsage, path length), no certificate on that path has expired, and the leaf names the MX host (3.2.2: the TLSA base domain; its subjectAltName DNS
  names, a wildcard standing for one leftmost label; the subject's CN only without them).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fastmta.delivery.dns import TlsaRecord

__all__ = ["DaneHost", "check", "connection_options", "tls_context", "usable_records"]

DANE_TA = 2
DANE_EE = 3
_DIGEST_SIZES = {0: None, 1: 32, 2: 64}
#: The private chain's certificates' DER encoding flag (``_ssl.ENCODING_DER``; public in 3.13).
_ENCODING_DER: int = getattr(getattr(ssl, "_ssl", None), "ENCODING_DER", 2)
#: Intermediates followed from the leaf to a trust anchor at most (a loop in a hostile chain ends).
_MAX_DEPTH = 8


@dataclass(frozen=True, slots=True)
class DaneHost:
    """What DANE asks of one MX host: its usable TLSA records (empty: TLS only, unauthenticated)
    and the names its certificate may carry under DANE-TA (the TLSA base domain first)."""

    records: tuple[TlsaRecord, ...]
    names: tuple[str, ...]

    def check(self, ssl_object: ssl.SSLObject) -> str | None:
        """Why the TLS peer behind *ssl_object* fails these records, or None when it passes."""
        return check(self, ssl_object)


def connection_options(
    host: DaneHost | None, context: ssl.SSLContext | None, name: str
) -> tuple[ssl.SSLContext | None, str, Callable[[ssl.SSLObject], str | None] | None]:
    """(TLS context, server name, check) of a connection to the host *name* that *host* says what DANE asks
    of: with usable records, no PKIX verification (the check decides) and the TLSA base domain as the
    server name (RFC 7672 8.1); with only unusable ones, the site's context as it is (a verification an
    MTA-STS policy asks for stays), no check; without DANE, the same."""
    if host is None or not host.records:
        return context, name, None
    return tls_context(), host.names[0], host.check


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The context of a DANE host's STARTTLS: no PKIX verification (DANE-EE certificates are often
    self-signed, DANE-TA anchors in no system store); :func:`check` decides after the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def usable_records(records: Sequence[TlsaRecord]) -> tuple[TlsaRecord, ...]:
    """The records of *records* an SMTP client may use (RFC 7672 3.1; a digest of the wrong size is not)."""
    out = []
    for r in records:
        if r.usage not in (DANE_TA, DANE_EE) or r.selector not in (0, 1) or r.mtype not in _DIGEST_SIZES:
            continue
        size = _DIGEST_SIZES[r.mtype]
        if (size is not None and len(r.data) != size) or not r.data:
            continue
        out.append(r)
    return tuple(out)


def check(host: DaneHost, ssl_object: ssl.SSLObject) -> str | None:
    """Why the TLS peer behind *ssl_object* fails *host*'s TLSA records, or None when it passes."""
    if not host.records:
        return None  # all unusable: encrypted is all that is asked
    try:
        return _check(host, ssl_object)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # a key type or encoding nobody here reads
        return f"its certificate could not be checked ({type(exc).__name__}: {exc})"


def _check(host: DaneHost, ssl_object: ssl.SSLObject) -> str | None:
    chain = _presented_chain(ssl_object)
    if not chain:
        return "the server presented no certificate"
    leaf = chain[0]
    for r in host.records:
        if r.usage == DANE_EE and _matches(r, leaf):
            return None
    ta_records = [r for r in host.records if r.usage == DANE_TA]
    if not ta_records:
        return "its certificate matches none of its TLSA records (DANE-EE)"
    why = _check_ta(ta_records, chain, host.names)
    return None if why is None else f"{why} (DANE-TA)"


def _presented_chain(ssl_object: ssl.SSLObject) -> list[x509.Certificate]:
    """The certificates the server sent, leaf first. Python 3.11 keeps the chain on the private
    ``_sslobj`` (public from 3.13 as ``get_unverified_chain``); without it, the leaf alone."""
    der: list[bytes] = []
    getter = getattr(ssl_object, "get_unverified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        for cert in getter() or ():
            der.append(cert if isinstance(cert, bytes) else cert.public_bytes(_ENCODING_DER))
    if not der:
        leaf = ssl_object.getpeercert(binary_form=True)
        if leaf:
            der.append(leaf)
    out = []
    for d in der:
        try:
            out.append(x509.load_der_x509_certificate(d))
        except ValueError:
            continue  # an undecodable certificate matches nothing
    return out


def _selected(selector: int, cert: x509.Certificate) -> bytes:
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _matches(record: TlsaRecord, cert: x509.Certificate) -> bool:
    data = _selected(record.selector, cert)
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def _check_ta(records: list[TlsaRecord], chain: list[x509.Certificate], names: tuple[str, ...]) -> str | None:
    leaf = chain[0]
    # A full certificate in a "2 0 0" record is a trust anchor the server need not send.
    anchors = list(chain[1:])
    for r in records:
        if r.selector == 0 and r.mtype == 0:
            try:
                anchors.append(x509.load_der_x509_certificate(r.data))
            except ValueError:
                pass
    now = datetime.datetime.now(datetime.UTC)
    current = leaf
    for below in range(_MAX_DEPTH):  # *below*: the CA certificates between this issuer and the leaf
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            return f"a certificate of its chain is out of its validity period ({current.subject.rfc4514_string()})"
        issuer = next((c for c in anchors if c.subject == current.issuer and _signed_by(current, c)), None)
        if issuer is None:
            return "its certificate chain leads to no certificate its TLSA records name"
        if not _may_issue(issuer, below):
            # A signature alone is not authority: an end entity under the anchor (any customer of a CA the
            # record names, "2 1 1" of Let's Encrypt's) would sign a certificate for anyone's MX.
            return f"a certificate of its chain signs others without being a CA allowed to ({issuer.subject.rfc4514_string()})"
        if any(_matches(r, issuer) for r in records):
            if not issuer.not_valid_before_utc <= now <= issuer.not_valid_after_utc:
                return f"its trust anchor is out of its validity period ({issuer.subject.rfc4514_string()})"
            if not _names_match(leaf, names):
                return f"its certificate names none of {', '.join(names)}"
            return None
        current = issuer
    return "its certificate chain is too long"


def _may_issue(cert: x509.Certificate, below: int) -> bool:
    """Is *cert* a CA (basicConstraints) that may sign certificates (keyUsage, when it says) with *below*
    CA certificates under it (pathLenConstraint), as RFC 5280 4.2.1.3 and 4.2.1.9 ask of every issuer?"""
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not basic.ca or (basic.path_length is not None and below > basic.path_length):
        return False
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage.key_cert_sign


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _names_match(cert: x509.Certificate, names: tuple[str, ...]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        presented = [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        presented = [str(a.value).lower().rstrip(".") for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return any(_name_matches(p, n.lower()) for p in presented for n in names)


def _name_matches(presented: str, name: str) -> bool:
    if presented.startswith("*."):
        # A wildcard stands for exactly one leftmost label (RFC 6125 6.4.3, as RFC 7672 3.2.3 allows).
        head, dot, rest = name.partition(".")
        return bool(head and dot) and rest == presented[2:]
    return presented == name
