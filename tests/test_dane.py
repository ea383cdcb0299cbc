"""DANE for SMTP (RFC 7672; ``[smtp] dane``): the MX host's certificate checked against its signed TLSA records.

Real parts: dnspython's resolver against the suite's DNS server on loopback (its ``signed`` zones
answer with the AD bit, as a validating resolver does), aiosmtpd with STARTTLS presenting a
certificate chosen by SNI, the engine delivering over real sockets; the certificates (self-signed,
and a test CA's chain) made with ``cryptography``.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dnsserver import DNSServer
from fastmta.delivery.config import config_from_dict
from fastmta.delivery.dane import DaneHost, usable_records
from fastmta.delivery.dns import TlsaRecord
from fastmta.delivery.engine import Engine, Status
from fastmta.queue.spool import Spool
from fastmta.smtp.tlscert import make_self_signed
from test_mta_sts import Collect
from test_mta_sts import _sni_context as sni_context

Run = Callable[[Coroutine[Any, Any, Any]], Any]
BODY = b"From: s@sender.test\r\nTo: r@x.test\r\nSubject: dane\r\n\r\nhello\r\n"
NOW = datetime.datetime.now(datetime.UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _spki_sha256(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


class OwnCA:
    """A certificate authority of the test's own, issuing leaf certificates served with its certificate."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastmta test CA")])
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, hostname: str, *, expired: bool = False) -> tuple[bytes, bytes]:
        """(leaf + CA chain PEM, key PEM) for *hostname*."""
        leaf, key = _leaf(hostname, self.cert.subject, self.key, expired=expired)
        return _pem(leaf) + _pem(self.cert), _key_pem(key)

    def issue_through_a_customer(self, hostname: str) -> tuple[bytes, bytes]:
        """A certificate for *hostname* signed by an end entity the CA issued to someone else (no CA itself)."""
        customer, customer_key = _leaf("customer.example", self.cert.subject, self.key)
        leaf, key = _leaf(hostname, customer.subject, customer_key)
        return _pem(leaf) + _pem(customer) + _pem(self.cert), _key_pem(key)


def _leaf(hostname: str, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey, *,
          expired: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    end = NOW - datetime.timedelta(days=1) if expired else NOW + datetime.timedelta(days=30)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(issuer).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=2)).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert, key


def _sni_context(certs: dict[str, tuple[bytes, bytes]]) -> ssl.SSLContext:
    """A server context presenting the certificate (chain) of the MX host name the client asked for
    (a self-signed one for any other name)."""
    unknown = make_self_signed("unknown.test")
    return sni_context({**certs, "unknown.test": (unknown.cert_pem, unknown.key_pem)}, "unknown.test")


def _zones(ns: DNSServer, tlsa: dict[str, str], unsigned: set[str], plain: list[str],
           failing: tuple[str, ...] = ()) -> Callable[[int], None]:
    """Each domain's MX at 127.0.0.1 with its TLSA record at ``_PORT._tcp.mx``: written once the port is
    known; the TLSA lookups of the *failing* domains answered SERVFAIL."""
    def write(port: int) -> None:
        for d in [*tlsa, *plain]:
            lines = ["@ MX 10 mx", "mx A 127.0.0.1"] + ([f"_{port}._tcp.mx TLSA {tlsa[d]}"] if d in tlsa else [])
            ns.add_zone(d, "\n".join(lines), signed=d not in unsigned)
        for d in failing:
            ns.servfail(f"_{port}._tcp.mx.{d}", "TLSA")
    return write


async def _deliver(ns: DNSServer, tls: ssl.SSLContext | None, zones: Callable[[int], None], domains: list[str],
                   tmp_path: Path, *, dane: bool = True, sites: dict[str, Any] | None = None,
                   ) -> tuple[dict[str, Any], list[tuple[str, bool]]]:
    collect = Collect()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(collect, tls_context=tls), "127.0.0.1", 0)
    zones(server.sockets[0].getsockname()[1])
    cfg = config_from_dict({
        "dns": {"nameservers": [ns.nameserver], "timeout": 3},
        "routing": {"smtp_port": server.sockets[0].getsockname()[1]},
        "smtp": {"tls": "opportunistic", "dane": dane, "mta_sts": {"enabled": False}},
        "queue": {"max_lifetime": 3, "retry_initial": 1},
        "sites": {**(sites or {}), "*": {"adaptive": {"enabled": False}}},
    })
    try:
        spool = Spool(tmp_path / "queue")
        async with Engine(cfg, spool=spool) as engine:
            ids = {d: await engine.submit(BODY, "s@sender.test", [f"r@{d}"]) for d in domains}
            outcomes = {d: (await asyncio.wait_for(engine.result(i), 20))[0] for d, i in ids.items()}
        await spool.close()
    finally:
        server.close()
    return outcomes, collect.got


def test_dane_hosts_get_tls_and_the_certificate_their_tlsa_records_name(run: Run, tmp_path: Path) -> None:
    ca = OwnCA()
    certs: dict[str, tuple[bytes, bytes]] = {}
    for host in ("mx.ee.test", "mx.eebad.test", "mx.unsigned.test", "mx.unusable.test", "mx.none.test",
                 "mx.servfail.test"):
        pair = make_self_signed(host)
        certs[host] = (pair.cert_pem, pair.key_pem)
    certs["mx.ta.test"] = ca.issue("mx.ta.test")
    certs["mx.taname.test"] = ca.issue("another.name.test")  # the CA's, but not for this host
    certs["mx.taold.test"] = ca.issue("mx.taold.test", expired=True)
    certs["mx.taee.test"] = ca.issue_through_a_customer("mx.taee.test")  # signed by a CA's customer: no authority
    pair = make_self_signed("mx.unusablev.test")
    certs["mx.unusablev.test"] = (pair.cert_pem, pair.key_pem)
    stranger = make_self_signed("mx.ee.test").cert_pem  # same name, another key
    ca_spki = _spki_sha256(_pem(ca.cert))
    tlsa = {
        "ee.test": f"3 1 1 {_spki_sha256(certs['mx.ee.test'][0])}",
        "eebad.test": f"3 1 1 {_spki_sha256(stranger)}",
        "ta.test": f"2 1 1 {ca_spki}",
        "taname.test": f"2 1 1 {ca_spki}",
        "taold.test": f"2 1 1 {ca_spki}",
        "unsigned.test": f"3 1 1 {_spki_sha256(stranger)}",  # wrong, but nothing says so securely
        "unusable.test": f"1 1 1 {_spki_sha256(stranger)}",  # PKIX-EE: unusable for SMTP, TLS still required
        "unusablev.test": f"1 1 1 {_spki_sha256(stranger)}",  # the same, at a site whose certificates are verified
        "taee.test": f"2 1 1 {ca_spki}",
        "servfail.test": f"3 1 1 {_spki_sha256(certs['mx.servfail.test'][0])}",
    }
    domains = [*tlsa, "none.test"]
    with DNSServer() as ns:
        zones = _zones(ns, tlsa, {"unsigned.test"}, ["none.test"], failing=("servfail.test",))
        outcomes, got = run(_deliver(ns, _sni_context(certs), zones, domains, tmp_path,
                                     sites={"mx.unusablev.test": {"tls_verify": True, "adaptive": {"enabled": False}}}))
        assert ns.errors == []
    status = {d: o.status for d, o in outcomes.items()}
    delivered = {r.split("@")[1]: over_tls for r, over_tls in got}
    # The key the DNS names (DANE-EE): delivered, over TLS; another key under the same name: never.
    assert status["ee.test"] is Status.DELIVERED and delivered["ee.test"] is True
    assert status["eebad.test"] is not Status.DELIVERED and "eebad.test" not in delivered
    assert outcomes["eebad.test"].reply.enhanced == "4.7.5" and "TLSA" in outcomes["eebad.test"].reply.text
    # Signed by the CA the DNS names (DANE-TA), for this host: delivered; for another name, or expired: not.
    assert status["ta.test"] is Status.DELIVERED and delivered["ta.test"] is True
    for d, why in (("taname.test", "names none of mx.taname.test"), ("taold.test", "validity period"),
                   ("taee.test", "without being a CA")):
        assert status[d] is not Status.DELIVERED and d not in delivered, d
        assert why in outcomes[d].reply.text, outcomes[d].reply
    # Records in an unsigned zone prove nothing: opportunistic TLS as without them (delivered).
    assert status["unsigned.test"] is Status.DELIVERED
    # Only unusable records (PKIX-EE): encrypted, unauthenticated; no TLSA at a signed host: as usual.
    assert status["unusable.test"] is Status.DELIVERED and delivered["unusable.test"] is True
    # ... and they turn off no verification the site asks for (its certificate is self-signed: refused).
    assert status["unusablev.test"] is not Status.DELIVERED and "unusablev.test" not in delivered
    assert status["none.test"] is Status.DELIVERED
    # A TLSA lookup that fails may hide records: the host is not used (RFC 7672 2.2.3), the mail waits.
    assert status["servfail.test"] is not Status.DELIVERED and "servfail.test" not in delivered
    assert "TLSA lookup" in outcomes["servfail.test"].reply.text


def test_a_dane_host_without_starttls_gets_nothing_in_clear_and_dane_off_changes_nothing(
        run: Run, tmp_path: Path) -> None:
    tlsa = {"dane.test": "3 1 1 " + "ab" * 32}
    with DNSServer() as ns:
        zones = _zones(ns, tlsa, set(), ["plain.test"])
        # A server that offers no STARTTLS (an attacker stripping it, RFC 7672 1.3): the mail waits.
        outcomes, got = run(_deliver(ns, None, zones, ["dane.test", "plain.test"], tmp_path / "on"))
        assert outcomes["dane.test"].status is not Status.DELIVERED and outcomes["dane.test"].reply.enhanced[2] == "7"
        assert got == [("r@plain.test", False)]
        # [smtp] dane off (the default): the records are not looked at.
        outcomes, got = run(_deliver(ns, None, zones, ["dane.test"], tmp_path / "off", dane=False))
        assert outcomes["dane.test"].status is Status.DELIVERED and got == [("r@dane.test", False)]
        assert ns.errors == []


def test_only_records_an_smtp_client_may_use_count() -> None:
    digest = bytes(32)
    records = [TlsaRecord(3, 1, 1, digest), TlsaRecord(2, 0, 1, digest), TlsaRecord(2, 1, 2, bytes(64)),
               TlsaRecord(3, 0, 0, b"\x30\x03"),
               TlsaRecord(1, 1, 1, digest), TlsaRecord(0, 0, 1, digest),  # PKIX-*: no CA is trusted between MTAs
               TlsaRecord(3, 2, 1, digest), TlsaRecord(3, 1, 3, digest),  # unknown selector, matching type
               TlsaRecord(3, 1, 1, bytes(31)), TlsaRecord(3, 1, 2, digest)]  # a digest of the wrong size
    assert usable_records(records) == tuple(records[:4])
    assert DaneHost((), ("mx.example",)).check(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_bio(
        ssl.MemoryBIO(), ssl.MemoryBIO())) is None  # none usable: encrypted is all that is asked


def test_a_dane_domain_never_shares_connections_with_one_routed_to_the_same_hosts_without_it(
        run: Run, tmp_path: Path) -> None:
    # Found by a review: one site per set of MX host names, and DANE is a fact of a domain's signed MX
    # answer. An unsigned domain routed first to the same host opened the site's connection without the
    # check, and the signed domain's mail rode on it, past a TLSA record that matched nothing.
    pair = make_self_signed("mx.host.test")
    stranger = make_self_signed("mx.host.test").cert_pem

    def zones(port: int) -> None:
        ns.add_zone("host.test", f"mx A 127.0.0.1\n_{port}._tcp.mx TLSA 3 1 1 {_spki_sha256(stranger)}", signed=True)
        ns.add_zone("plain.test", "@ MX 10 mx.host.test.", signed=False)
        ns.add_zone("dane.test", "@ MX 10 mx.host.test.", signed=True)

    with DNSServer() as ns:
        outcomes, got = run(_deliver(ns, _sni_context({"mx.host.test": (pair.cert_pem, pair.key_pem)}), zones,
                                     ["plain.test", "dane.test"], tmp_path))
        assert ns.errors == []
    assert outcomes["plain.test"].status is Status.DELIVERED
    assert outcomes["dane.test"].status is not Status.DELIVERED and "TLSA" in outcomes["dane.test"].reply.text
    assert got == [("r@plain.test", True)]
