"""DNSSEC for real: fastmta's resolver behind a validating unbound, in front of NSD serving signed zones.

``tests/test_dane.py`` stands a resolver in with the suite's DNS server, whose ``signed`` zones just
set the AD bit. Here nothing stands in: the zones are really signed (ECDSA P-256, NSEC, by dnspython's
``dns.dnssec.sign_zone``), served by NSD (an authoritative server nobody here wrote) and validated by
unbound from one trust anchor, the DS of the parent zone ``test.``: the chain of trust runs from it
through the DS records of the signed children, and an unsigned child is proved insecure by the
parent's signed NSEC record (no DS), as on the Internet. fastmta's ``DnsResolver`` asks unbound with
the AD bit set (RFC 6840 5.7) and must report what unbound validated: signed answers (positive,
NODATA, NXDOMAIN) secure, unsigned ones not, bogus ones (a record changed after signing, expired
signatures) a temporary error, never an insecure answer. The router then gives DANE to the hosts
of the signed domains only (RFC 7672 2.2).

Both servers run from ``/usr/sbin`` (Debian's ``unbound`` and ``nsd`` packages, installed by
``.ci/run``) on free loopback ports, each proven ours by its identity (a random token answered to
``id.server CH TXT``), with their files in a temporary directory; they only ever talk to each other
over 127.0.0.1 (a stub zone for the root too, so nothing can leave the machine), and are stopped by
PID. Without the binaries the tests fail under CI (``CI`` set) and are skipped elsewhere.
"""

from __future__ import annotations

import datetime
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.zone
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning
from dns.dnssectypes import Algorithm

from fastmta.delivery.config import DnsConfig, config_from_dict
from fastmta.delivery.dane import DaneHost
from fastmta.delivery.dns import DnsResolver, DnsTemporaryError, MxRecord, Status, TlsaRecord
from fastmta.delivery.routing import Route, RouteFailure, Router

with warnings.catch_warnings():
    # dnspython's DSA module, loaded with dns.dnssec and never used here, warns that DSA is deprecated.
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    import dns.dnssec

pytestmark = pytest.mark.interop

Run = Callable[[Coroutine[Any, Any, Any]], Any]
HOST = "127.0.0.1"
SBIN = ("/usr/sbin", "/usr/local/sbin")
SMTP_PORT = 2525  # the TLSA records are at _2525._tcp.HOST; nothing connects to it
DIGEST = bytes.fromhex("a1" * 32)  # a DANE-EE SPKI SHA2-256, as published
START_TIMEOUT = 15.0


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))
    if path is None:
        why = f"{name} not found: install Debian's {package} package (.ci/run installs it)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{why}; under CI this test is not skipped", pytrace=False)
        pytest.skip(why)
    return path


# ------------------------------------------------------------------ zones

NOW = datetime.datetime.now(datetime.UTC)


@dataclass
class Key:
    private: ec.EllipticCurvePrivateKey
    dnskey: Any  # dns.rdtypes.ANY.DNSKEY.DNSKEY

    @classmethod
    def new(cls) -> Key:
        private = ec.generate_private_key(ec.SECP256R1())
        flags = dns.dnssec.Flag.ZONE | dns.dnssec.Flag.SEP  # one key signs all (a CSK)
        return cls(private, dns.dnssec.make_dnskey(private.public_key(), Algorithm.ECDSAP256SHA256, flags))

    def ds(self, zone: str) -> str:
        return dns.dnssec.make_ds(zone + ".", self.dnskey, "SHA256").to_text()


def _apex(zone: str) -> list[str]:
    return [f"@ 300 IN SOA ns.test. hostmaster.{zone}. 1 3600 600 86400 300", "@ 300 IN NS ns.test."]


def _zone_text(zone: str, records: list[str], key: Key | None = None, *,
               valid: tuple[datetime.datetime, datetime.datetime] | None = None,
               tamper: tuple[tuple[str, str, str], ...] = ()) -> str:
    """*zone*'s master file: *records* under its apex, signed with *key* (NSEC), the signatures valid
    over *valid* (default: from an hour ago for a week); then each (name, type, rdata) of *tamper*
    replaces that RRset, its signature kept: bogus data, as an attacker's."""
    origin = dns.name.from_text(zone + ".")
    z = dns.zone.from_text("\n".join([*_apex(zone), *records]) + "\n", origin, relativize=False)
    if key is not None:
        start, end = valid or (NOW - datetime.timedelta(hours=1), NOW + datetime.timedelta(days=7))
        dns.dnssec.sign_zone(z, keys=[(key.private, key.dnskey)], inception=start, expiration=end)
    for name, rdtype, rdata in tamper:
        owner = dns.name.from_text(name, origin)
        old = z.find_rdataset(owner, rdtype)
        assert z.get_rdataset(owner, "RRSIG", covers=rdtype) is not None, (name, rdtype)
        z.replace_rdataset(owner, dns.rdataset.from_text("IN", rdtype, old.ttl, rdata))
    return z.to_text(relativize=False)


def _mx_zone(*extra: str) -> list[str]:
    return ["@ 300 IN MX 10 mx", "mx 300 IN A 127.0.0.1", *extra]


TLSA = f"3 1 1 {DIGEST.hex()}"


def _zones() -> tuple[dict[str, str], str]:
    """Every zone's master file, and the trust anchor (the DS of ``test.``) for unbound."""
    keys = {z: Key.new() for z in ("test", "signed.test", "bogus.test", "badtlsa.test", "expired.test",
                                   "alias.test", "leak.test", "provider.test", "implicit.test", "halfbogus.test")}
    tlsa = f"_{SMTP_PORT}._tcp.mx 300 IN TLSA {TLSA}"
    expired = NOW - datetime.timedelta(days=30), NOW - datetime.timedelta(days=1)
    children: dict[str, str] = {
        # MX, A and TLSA signed; no AAAA (NODATA, proved by NSEC).
        "signed.test": _zone_text("signed.test", _mx_zone(tlsa), keys["signed.test"]),
        # No DS for it in test.: insecure, provably (the parent's NSEC says so).
        "unsigned.test": _zone_text("unsigned.test", _mx_zone(tlsa)),
        # Signed, then the MX and the address changed: both bogus.
        "bogus.test": _zone_text("bogus.test", _mx_zone(tlsa), keys["bogus.test"],
                                 tamper=(("@", "MX", "20 mx"), ("mx", "A", "127.0.0.2"))),
        # Signed, then the TLSA record changed: MX and address secure, TLSA bogus.
        "badtlsa.test": _zone_text("badtlsa.test", _mx_zone(tlsa), keys["badtlsa.test"],
                                   tamper=((f"_{SMTP_PORT}._tcp.mx", "TLSA", f"3 1 1 {'b2' * 32}"),)),
        # Signatures that expired yesterday.
        "expired.test": _zone_text("expired.test", _mx_zone(tlsa), keys["expired.test"],
                                   valid=expired),
        # The MX host a CNAME to the signed zone's host (both zones signed): the TLSA at the target.
        "alias.test": _zone_text("alias.test", ["@ 300 IN MX 10 mail", "mail 300 IN CNAME mx.signed.test."],
                                 keys["alias.test"]),
        # The MX host a CNAME into the unsigned zone: the MX is secure, the address is not.
        "leak.test": _zone_text("leak.test", ["@ 300 IN MX 10 mail", "mail 300 IN CNAME mx.unsigned.test."],
                                keys["leak.test"]),
        # The same, with TLSA records at the alias's own (signed) name: they apply (RFC 7672 2.2.2).
        "provider.test": _zone_text("provider.test", ["@ 300 IN MX 10 mail", "mail 300 IN CNAME mx.unsigned.test.",
                                                      f"_{SMTP_PORT}._tcp.mail 300 IN TLSA {TLSA}"],
                                    keys["provider.test"]),
        # No MX: the domain is its own host (RFC 5321 5.1), its TLSA records at _PORT._tcp.DOMAIN.
        "implicit.test": _zone_text("implicit.test", ["@ 300 IN A 127.0.0.1", f"_{SMTP_PORT}._tcp 300 IN TLSA {TLSA}"],
                                    keys["implicit.test"]),
        # The MX host's A record signed, its AAAA changed after signing: bogus.
        "halfbogus.test": _zone_text("halfbogus.test", _mx_zone("mx 300 IN AAAA ::1", tlsa),
                                     keys["halfbogus.test"], tamper=(("mx", "AAAA", "::2"),)),
    }
    delegations = ["ns 300 IN A 127.0.0.1"]
    for child in children:
        label = child.removesuffix(".test")
        delegations.append(f"{label} 300 IN NS ns.test.")
        if child in keys:
            delegations.append(f"{label} 300 IN DS {keys[child].ds(child)}")
    zones = {"test": _zone_text("test", delegations, keys["test"]), **children}
    return zones, f"test. DS {keys['test'].ds('test')}"


# ---------------------------------------------------------------- servers


def _free_port() -> int:
    """A port free for both UDP and TCP on loopback (bound, read back, closed: a small race remains,
    which the identity check catches)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


def _identity(port: int, *, tcp: bool = False) -> str | None:
    """What the server at *port* answers to ``id.server CH TXT`` (NSD and unbound both do), or None."""
    query = dns.message.make_query("id.server.", dns.rdatatype.TXT, dns.rdataclass.CH)
    try:
        response = (dns.query.tcp if tcp else dns.query.udp)(query, HOST, timeout=0.5, port=port)
    except (OSError, dns.exception.DNSException):
        return None
    for rrset in response.answer:
        for rd in rrset:
            return b"".join(rd.strings).decode()  # type: ignore[attr-defined]
    return None


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-30:])
    except OSError:
        return "(no log)"


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


def _start(name: str, argv: Callable[[int, str], list[str]], log: Path) -> Server:
    """Start a server on a free port (``argv(port, token)``); up when both its UDP and TCP listeners
    answer with *token*. A few tries, in case another process took the port in between."""
    last = "no try"
    for _attempt in range(3):
        port, token = _free_port(), f"{name}-{secrets.token_hex(6)}"
        with log.with_suffix(".stderr").open("wb") as err:
            proc = subprocess.Popen(argv(port, token), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if _identity(port) == token and _identity(port, tcp=True) == token:
                return Server(name, port, proc, log)
            time.sleep(0.05)
        last = (f"{name} exited with {proc.returncode}" if proc.poll() is not None
                else f"{name} did not answer on {HOST}:{port} within {START_TIMEOUT:g}s")
        _stop(proc)
        last += f"\n--- log\n{_tail(log)}\n--- stderr\n{_tail(log.with_suffix('.stderr'))}"
    raise RuntimeError(last)


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            out[int(entry)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
    return out


def _descendants(pid: int) -> list[int]:
    parents = _parents()
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :][:1] not in (b"Z", b"X")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server by its PID, and the processes it forked (NSD's main and server processes, which
    outlive the first one by up to a second) by theirs."""
    family = _descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in family:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _nsd_conf(root: Path, zones: dict[str, str], port: int, token: str) -> Path:
    for name, text in zones.items():
        (root / f"{name}.zone").write_text(text)
    conf = root / "nsd.conf"
    conf.write_text("\n".join([
        "server:",
        f'  ip-address: {HOST}',
        f"  port: {port}",
        "  do-ip6: no",
        "  reuseport: no",
        "  server-count: 1",
        '  username: ""',
        '  chroot: ""',
        f'  zonesdir: "{root}"',
        '  database: ""',
        f'  zonelistfile: "{root}/zone.list"',
        f'  xfrdfile: "{root}/xfrd.state"',
        f'  xfrdir: "{root}"',
        f'  pidfile: "{root}/nsd.pid"',
        f'  logfile: "{root}/nsd.log"',
        "  verbosity: 1",
        "  hide-identity: no",
        f'  identity: "{token}"',
        "remote-control:",
        "  control-enable: no",
        *(line for name in zones for line in ("zone:", f'  name: "{name}."', f'  zonefile: "{name}.zone"')),
        "",
    ]))
    return conf


def _unbound_conf(root: Path, port: int, token: str, nsd_port: int, anchor: str, zones: list[str]) -> Path:
    conf = root / "unbound.conf"
    stub = f"{HOST}@{nsd_port}"
    conf.write_text("\n".join([
        "server:",
        f"  interface: {HOST}",
        f"  port: {port}",
        f"  outgoing-interface: {HOST}",  # its own queries leave from loopback, to loopback only
        "  do-ip6: no",
        "  do-not-query-localhost: no",
        "  num-threads: 1",
        "  outgoing-range: 64",
        "  num-queries-per-thread: 32",
        "  so-reuseport: no",
        '  chroot: ""',
        '  username: ""',
        f'  directory: "{root}"',
        f'  pidfile: "{root}/unbound.pid"',
        f'  logfile: "{root}/unbound.log"',
        "  use-syslog: no",
        "  verbosity: 1",
        "  val-log-level: 2",  # why an answer is bogus, in the log
        "  hide-identity: no",
        f'  identity: "{token}"',
        "  module-config: \"validator iterator\"",
        f'  trust-anchor: "{anchor}"',
        "  trust-anchor-signaling: no",
        '  local-zone: "test." nodefault',  # RFC 6761's test. is answered locally by default
        "remote-control:",
        "  control-enable: no",
        # Every name asked is under a stub at NSD; the root's stub is there too, so no root hint is
        # ever used (NSD refuses what it does not serve).
        *(line for z in [".", *(f"{z}." for z in zones)] for line in ("stub-zone:", f'  name: "{z}"', f"  stub-addr: {stub}")),
        "",
    ]))
    return conf


@dataclass
class Dns:
    nsd: Server
    unbound: Server

    @property
    def nameserver(self) -> str:
        return f"{HOST}:{self.unbound.port}"

    def resolver(self) -> DnsResolver:
        return DnsResolver(DnsConfig(nameservers=[self.nameserver], timeout=5))


@pytest.fixture(scope="module")
def dnssec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dns]:
    nsd_exe, unbound_exe = _tool("nsd", "nsd"), _tool("unbound", "unbound")
    root = tmp_path_factory.mktemp("dnssec")
    zones, anchor = _zones()
    nsd = _start("nsd", lambda port, token: [nsd_exe, "-d", "-c", str(_nsd_conf(root, zones, port, token))],
                 root / "nsd.log")
    try:
        unbound = _start("unbound", lambda port, token: [unbound_exe, "-d", "-c", str(
            _unbound_conf(root, port, token, nsd.port, anchor, list(zones)))], root / "unbound.log")
        try:
            yield Dns(nsd, unbound)
        finally:
            _stop(unbound.proc)
    finally:
        _stop(nsd.proc)


# ------------------------------------------------------------------ tests


def _ask(port: int, name: str, rdtype: str, flags: int, *, dnssec_ok: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, want_dnssec=dnssec_ok)
    query.flags = flags
    return dns.query.udp(query, HOST, timeout=3, port=port)


def test_the_zones_are_signed_and_only_the_validating_resolver_sets_ad(dnssec: Dns) -> None:
    rd_ad = dns.flags.RD | dns.flags.AD
    # NSD serves the signatures (asked with DO) and, being authoritative, never says AD itself.
    direct = _ask(dnssec.nsd.port, "signed.test.", "MX", rd_ad, dnssec_ok=True)
    assert {rrset.rdtype for rrset in direct.answer} == {dns.rdatatype.MX, dns.rdatatype.RRSIG}
    assert not direct.flags & dns.flags.AD
    # unbound says AD when the query asks for it (RFC 6840 5.7), as fastmta's do; not to a plain RD query.
    assert _ask(dnssec.unbound.port, "signed.test.", "MX", rd_ad).flags & dns.flags.AD
    assert not _ask(dnssec.unbound.port, "signed.test.", "MX", dns.flags.RD).flags & dns.flags.AD
    assert _ask(dnssec.unbound.port, "bogus.test.", "MX", rd_ad).rcode() == dns.rcode.SERVFAIL


def test_the_resolver_reports_what_unbound_validated(dnssec: Dns, run: Run) -> None:
    tlsa_name = f"_{SMTP_PORT}._tcp.mx"

    async def scenario() -> None:
        res = dnssec.resolver()
        try:
            # Signed: positive answers, NODATA and NXDOMAIN (NSEC proofs) all secure.
            mx = await res.mx("signed.test")
            assert (mx.status, mx.records, mx.secure) == (Status.FOUND, (MxRecord(10, "mx.signed.test"),), True)
            a = await res.addresses("mx.signed.test", 4)
            assert (a.status, a.addresses, a.secure) == (Status.FOUND, ("127.0.0.1",), True)
            aaaa = await res.addresses("mx.signed.test", 6)
            assert (aaaa.status, aaaa.addresses, aaaa.secure) == (Status.NODATA, (), True)
            tlsa = await res.tlsa(f"{tlsa_name}.signed.test")
            assert (tlsa.status, tlsa.records, tlsa.secure) == (Status.FOUND, (TlsaRecord(3, 1, 1, DIGEST),), True)
            missing = await res.tlsa("_25._tcp.mx.signed.test")
            assert (missing.status, missing.secure) == (Status.NXDOMAIN, True)
            nothing = await res.mx("nothere.signed.test")
            assert (nothing.status, nothing.secure) == (Status.NXDOMAIN, True)
            # A CNAME chain across two signed zones: secure, the target's name canonical.
            via = await res.addresses("mail.alias.test", 4)
            assert (via.status, via.name, via.addresses, via.secure) == (
                Status.FOUND, "mx.signed.test", ("127.0.0.1",), True)

            # Unsigned (an insecure delegation): the same kinds of answers, none secure.
            mx = await res.mx("unsigned.test")
            assert (mx.status, mx.records, mx.secure) == (Status.FOUND, (MxRecord(10, "mx.unsigned.test"),), False)
            a = await res.addresses("mx.unsigned.test", 4)
            assert (a.status, a.secure) == (Status.FOUND, False)
            assert (await res.addresses("mx.unsigned.test", 6)).secure is False
            tlsa = await res.tlsa(f"{tlsa_name}.unsigned.test")
            assert (tlsa.status, tlsa.records, tlsa.secure) == (Status.FOUND, (TlsaRecord(3, 1, 1, DIGEST),), False)
            assert (await res.mx("nothere.unsigned.test")).secure is False
            # A signed MX whose host is a CNAME into the unsigned zone: the address is not secure.
            assert (await res.mx("leak.test")).secure is True
            leak = await res.addresses("mail.leak.test", 4)
            assert (leak.status, leak.name, leak.secure) == (Status.FOUND, "mx.unsigned.test", False)

            # Bogus (changed after signing, or expired signatures): unbound answers SERVFAIL, fastmta a
            # temporary error, never an answer (secure or not).
            for lookup in (res.mx("bogus.test"), res.addresses("mx.bogus.test", 4),
                           res.tlsa(f"{tlsa_name}.badtlsa.test"),
                           res.mx("expired.test"), res.addresses("mx.expired.test", 4),
                           res.tlsa(f"{tlsa_name}.expired.test")):
                with pytest.raises(DnsTemporaryError, match="SERVFAIL"):
                    await lookup
            # Only the changed records are bogus: the rest of that zone still validates.
            assert (await res.mx("badtlsa.test")).secure is True
            assert (await res.addresses("mx.badtlsa.test", 4)).secure is True
            assert (await res.addresses("mx.halfbogus.test", 4)).secure is True
            with pytest.raises(DnsTemporaryError, match="SERVFAIL"):
                await res.addresses("mx.halfbogus.test", 6)
        finally:
            await res.aclose()

    run(scenario())


async def _routes(dnssec: Dns, *domains: str) -> dict[str, Route | RouteFailure]:
    """How a router with DANE on, behind the validating resolver, routes *domains*."""
    router = Router(config_from_dict({
        "dns": {"nameservers": [dnssec.nameserver], "timeout": 5},
        "smtp": {"dane": True, "mta_sts": {"enabled": False}},
        "routing": {"smtp_port": SMTP_PORT},
    }))
    try:
        return {d: await router.route(d) for d in domains}
    finally:
        await router.aclose()


def test_the_router_gives_dane_to_validated_hosts_only(dnssec: Dns, run: Run) -> None:
    records = (TlsaRecord(3, 1, 1, DIGEST),)

    routes = run(_routes(dnssec, "signed.test", "unsigned.test", "alias.test", "leak.test", "provider.test",
                         "implicit.test", "badtlsa.test", "bogus.test", "expired.test"))
    ok = {d: r for d, r in routes.items() if isinstance(r, Route)}
    assert sorted(ok) == ["alias.test", "implicit.test", "leak.test", "provider.test", "signed.test",
                          "unsigned.test"], routes
    hosts = {d: r.hosts for d, r in ok.items()}
    assert [(h.name, h.addresses, h.port) for h in hosts["signed.test"]] == [("mx.signed.test", ("127.0.0.1",), SMTP_PORT)]
    assert hosts["signed.test"][0].dane == DaneHost(records, ("mx.signed.test",))
    # No MX (a secure NODATA): the domain is the host, and its own TLSA records apply (RFC 7672 2.2.2).
    assert ok["implicit.test"].source == "implicit"
    assert hosts["implicit.test"][0].dane == DaneHost(records, ("implicit.test",))
    # The TLSA records of the CNAME's target; the certificate may name either (RFC 7672 2.2.2, 3.2.2).
    assert hosts["alias.test"][0].name == "mail.alias.test"
    assert hosts["alias.test"][0].dane == DaneHost(records, ("mx.signed.test", "mail.alias.test"))
    # Records in an unsigned zone, or an MX host whose address is not signed: no DANE.
    assert hosts["unsigned.test"][0].dane is None
    assert hosts["leak.test"][0].dane is None
    # ... unless the alias itself is signed and has TLSA records of its own: those apply.
    assert hosts["provider.test"][0].dane == DaneHost(records, ("mail.provider.test",))
    # A bogus TLSA lookup may hide records: the host is not used, the mail waits (RFC 7672 2.2.3).
    bad = routes["badtlsa.test"]
    assert isinstance(bad, RouteFailure) and bad.transient and bad.reply.enhanced == "4.7.5", bad
    assert "TLSA lookup for mx.badtlsa.test failed" in bad.reply.text
    # A bogus MX answer: a temporary DNS failure, never routed as if unsigned.
    for d in ("bogus.test", "expired.test"):
        failure = routes[d]
        assert isinstance(failure, RouteFailure) and failure.transient, failure
        assert (failure.reply.code, failure.reply.enhanced) == (451, "4.4.3"), failure


def test_a_failed_address_lookup_does_not_turn_dane_off(dnssec: Dns, run_uvloop: Run) -> None:
    route = run_uvloop(_routes(dnssec, "halfbogus.test"))["halfbogus.test"]  # MX, A, TLSA signed; AAAA bogus
    if isinstance(route, RouteFailure):
        assert route.transient, route
    else:
        assert all(h.dane is not None for h in route.hosts), route
