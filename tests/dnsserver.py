"""A real authoritative DNS server on loopback for tests.

UDP and TCP on the same ephemeral port, answers built with dnspython's
message and zone APIs from zones the test gives as text (or record by
record), so the code under test speaks real DNS on the wire and dnspython's
resolver runs for real. It runs in its own thread, so it serves any event
loop (asyncio, uvloop) and synchronous code alike, and tests can change it
while it runs ("the zone heals").

Fault injection, per name (optionally per type):
- ``servfail(name)``: answer SERVFAIL;
- ``drop(name)``: never answer (the client times out);
- ``truncate(name)``: over UDP answer with the TC bit and no records, so
  the client must retry over TCP (answers too big for the client's UDP
  payload are truncated the same way, as a real server does).

Every query is counted per (name, type) and per transport, so a test can
assert "one lookup per domain per TTL" at the server, where it happens.

DNSSEC: a zone added with ``signed=True`` stands for one a validating
resolver has checked: answers from it (and from signed zones only, along a
CNAME chain) carry the AD bit when the query asked for it (AD or DO, RFC 6840
5.7), as a validating resolver on loopback answers. This server signs nothing.
"""

from __future__ import annotations

import secrets
import selectors
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone

__all__ = ["DNSServer"]

_IN = dns.rdataclass.IN
_MAX_CHAIN = 8
_PROBE_ZONE = dns.name.from_text("fastmta-dnsserver-probe.invalid.")


def _name(name: str | dns.name.Name) -> dns.name.Name:
    if isinstance(name, dns.name.Name):
        return name
    return dns.name.from_text(name if name.endswith(".") else name + ".")


def _key(name: str | dns.name.Name) -> str:
    """Counting key: lower case, no trailing dot (``mx1.example.test``)."""
    return _name(name).to_text(omit_final_dot=True).lower()


def _type(rdtype: str | int | dns.rdatatype.RdataType) -> dns.rdatatype.RdataType:
    if isinstance(rdtype, str):
        return dns.rdatatype.from_text(rdtype)
    return dns.rdatatype.RdataType.make(rdtype)


class DNSServer:
    """Authoritative server for test zones on ``127.0.0.1:<port>`` (UDP and TCP).

    Use as a context manager::

        with DNSServer({"example.test": "@ MX 10 mx1\\nmx1 A 127.0.0.1"}) as ns:
            config = DnsConfig(nameservers=[ns.nameserver])
    """

    def __init__(
        self,
        zones: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        default_ttl: int = 300,
        soa_minimum: int = 60,
    ) -> None:
        self.host = host
        self.default_ttl = default_ttl
        self.soa_minimum = soa_minimum
        self._lock = threading.RLock()
        self._zones: dict[dns.name.Name, dns.zone.Zone] = {}
        self._signed: set[dns.name.Name] = set()
        self._servfail: set[tuple[str, int | None]] = set()
        self._drop: set[tuple[str, int | None]] = set()
        self._truncate: set[tuple[str, int | None]] = set()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._tcp_counts: Counter[tuple[str, str]] = Counter()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._probe_token = secrets.token_hex(8)
        self.port = 0
        self.errors: list[BaseException] = []
        #: Seconds to hold every UDP answer (0: answer at once).
        self.delay = 0.0
        #: Most UDP queries received and not yet answered at one time.
        self.peak_outstanding = 0
        self._outstanding = 0
        self._timers: list[threading.Timer] = []
        for origin, text in (zones or {}).items():
            self.add_zone(origin, text)

    # ------------------------------------------------------------- zones

    def add_zone(self, origin: str, text: str = "", *, soa_minimum: int | None = None, signed: bool = False) -> None:
        """Serve (or replace) the zone *origin* from master-file *text* (*signed*: see the module's DNSSEC).

        Records without a TTL get ``default_ttl``; a zone without an SOA gets
        one whose MINIMUM (the negative-caching TTL, RFC 2308) is
        *soa_minimum*. Relative names are relative to *origin*.
        """
        minimum = self.soa_minimum if soa_minimum is None else soa_minimum
        origin_name = _name(origin)
        zone = dns.zone.from_text(
            f"$TTL {self.default_ttl}\n{text}\n",
            origin=origin_name,
            relativize=False,  # absolute names render to wire without an origin
            check_origin=False,
        )
        if zone.get_rdataset(origin_name, "SOA") is None:
            soa = dns.rdataset.from_text(
                _IN, "SOA", minimum,
                f"ns.{origin_name} hostmaster.{origin_name} 1 3600 600 86400 {minimum}",
            )
            zone.replace_rdataset(origin_name, soa)
        with self._lock:
            self._zones[origin_name] = zone
            (self._signed.add if signed else self._signed.discard)(origin_name)

    def remove_zone(self, origin: str) -> None:
        with self._lock:
            del self._zones[_name(origin)]

    def set_records(self, name: str, rdtype: str, *values: str, ttl: int | None = None) -> None:
        """Replace the records of (*name*, *rdtype*); no values deletes them."""
        qname = _name(name)
        with self._lock:
            zone = self._zone_for(qname)
            if zone is None:
                raise KeyError(f"no zone for {name}")
            if not values:
                zone.delete_rdataset(qname, rdtype)
                return
            rds = dns.rdataset.from_text_list(
                _IN, rdtype, self.default_ttl if ttl is None else ttl, list(values),
                origin=zone.origin,
                relativize=False,
            )
            zone.replace_rdataset(qname, rds)

    def delete_name(self, name: str) -> None:
        """Remove every record of *name* (it becomes NXDOMAIN)."""
        qname = _name(name)
        with self._lock:
            zone = self._zone_for(qname)
            if zone is not None:
                zone.delete_node(qname)

    # --------------------------------------------------------------- faults

    @staticmethod
    def _fault_key(name: str, rdtype: str | None) -> tuple[str, int | None]:
        return (_key(name), None if rdtype is None else int(_type(rdtype)))

    def servfail(self, name: str, rdtype: str | None = None) -> None:
        with self._lock:
            self._servfail.add(self._fault_key(name, rdtype))

    def drop(self, name: str, rdtype: str | None = None) -> None:
        with self._lock:
            self._drop.add(self._fault_key(name, rdtype))

    def truncate(self, name: str, rdtype: str | None = None) -> None:
        with self._lock:
            self._truncate.add(self._fault_key(name, rdtype))

    def heal(self, name: str | None = None) -> None:
        """Stop injecting faults for *name* (every name when None)."""
        with self._lock:
            for faults in (self._servfail, self._drop, self._truncate):
                if name is None:
                    faults.clear()
                else:
                    k = _key(name)
                    faults.difference_update({f for f in faults if f[0] == k})

    @staticmethod
    def _has(faults: set[tuple[str, int | None]], key: str, rdtype: int) -> bool:
        return (key, None) in faults or (key, rdtype) in faults

    # --------------------------------------------------------------- counts

    def count(self, name: str, rdtype: str | None = None, *, tcp: bool = False) -> int:
        """Queries received for *name* (of *rdtype*, or all types), over TCP only if *tcp*."""
        k = _key(name)
        t = None if rdtype is None else _type(rdtype).name
        with self._lock:
            counts = self._tcp_counts if tcp else self._counts
            return sum(n for (qn, qt), n in counts.items() if qn == k and (t is None or qt == t))

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._tcp_counts.clear()

    # -------------------------------------------------------------- answers

    def _zone_for(self, qname: dns.name.Name) -> dns.zone.Zone | None:
        best: dns.zone.Zone | None = None
        for origin, zone in self._zones.items():
            if qname.is_subdomain(origin) and (best is None or len(origin) > len(best.origin or ())):
                best = zone
        return best

    def _add_soa(self, resp: dns.message.Message, zone: dns.zone.Zone) -> None:
        origin = zone.origin
        assert origin is not None
        soa = zone.get_rdataset(origin, "SOA")
        if soa is not None:
            rrset = dns.rrset.RRset(origin, _IN, dns.rdatatype.SOA)
            rrset.update(soa)
            resp.authority.append(rrset)

    def answer(self, query: dns.message.Message, *, tcp: bool) -> dns.message.Message | None:
        """The response to *query*, or None to stay silent."""
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        if len(query.question) != 1:
            resp.set_rcode(dns.rcode.FORMERR)
            return resp
        q = query.question[0]
        qname, qtype = q.name, q.rdtype
        key = _key(qname)
        with self._lock:
            self._counts[(key, qtype.name)] += 1
            if tcp:
                self._tcp_counts[(key, qtype.name)] += 1
            if qname.is_subdomain(_PROBE_ZONE):
                rrset = dns.rrset.from_text(qname, 0, _IN, "TXT", f'"{self._probe_token}"')
                resp.answer.append(rrset)
                return resp
            if self._has(self._drop, key, qtype):
                return None
            if self._has(self._servfail, key, qtype):
                resp.set_rcode(dns.rcode.SERVFAIL)
                return resp
            if not tcp and self._has(self._truncate, key, qtype):
                resp.flags |= dns.flags.TC
                return resp
            used = self._resolve_into(resp, qname, qtype)
            asked = bool(query.flags & dns.flags.AD) or bool(query.ednsflags & dns.flags.DO)
            if asked and used and all(origin in self._signed for origin in used):
                resp.flags |= dns.flags.AD
        return resp

    def _resolve_into(
        self, resp: dns.message.Message, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
    ) -> list[dns.name.Name]:
        """Answer into *resp*; the origins of the zones the answer came from."""
        name = qname
        used: list[dns.name.Name] = []
        for hop in range(_MAX_CHAIN + 1):
            zone = self._zone_for(name)
            if zone is None:
                if hop == 0:
                    resp.set_rcode(dns.rcode.REFUSED)  # not authoritative for it
                    resp.flags &= ~dns.flags.AA
                return used  # a CNAME out of our zones: the client follows it
            used.append(zone.origin)
            node = zone.get_node(name)
            if node is None:
                # An empty non-terminal (a name with descendants but no
                # records of its own) exists: NODATA, not NXDOMAIN.
                exists = any(n.is_subdomain(name) for n in zone.nodes)
                if not exists:
                    resp.set_rcode(dns.rcode.NXDOMAIN)
                self._add_soa(resp, zone)
                return used
            rds = node.get_rdataset(_IN, qtype)
            if rds is not None:
                rrset = dns.rrset.RRset(name, _IN, qtype)
                rrset.update(rds)
                resp.answer.append(rrset)
                return used
            cname = node.get_rdataset(_IN, dns.rdatatype.CNAME)
            if cname is not None and qtype != dns.rdatatype.CNAME:
                rrset = dns.rrset.RRset(name, _IN, dns.rdatatype.CNAME)
                rrset.update(cname)
                resp.answer.append(rrset)
                target = cname[0].target  # type: ignore[attr-defined]
                name = target
                continue
            self._add_soa(resp, zone)  # NODATA
            return used
        return used

    def _answer_safely(self, query: dns.message.Message, *, tcp: bool) -> dns.message.Message | None:
        # A bug here must not kill the server thread silently: keep it for
        # the test to see (``errors``) and answer SERVFAIL.
        try:
            return self.answer(query, tcp=tcp)
        except Exception as exc:
            self.errors.append(exc)
            resp = dns.message.make_response(query)
            resp.set_rcode(dns.rcode.SERVFAIL)
            return resp

    @staticmethod
    def _wire(query: dns.message.Message, resp: dns.message.Message, max_size: int) -> bytes:
        try:
            return resp.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            # What a real server does: drop the records, set TC, the client
            # asks again over TCP.
            short = dns.message.make_response(query)
            short.flags = resp.flags | dns.flags.TC
            short.set_rcode(resp.rcode())
            return short.to_wire()

    # ---------------------------------------------------------- transport

    def _handle_udp(self, sock: socket.socket) -> None:
        try:
            data, peer = sock.recvfrom(65535)
        except OSError:
            return
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        resp = self._answer_safely(query, tcp=False)
        if resp is None:
            return
        max_size = query.payload if query.edns >= 0 else 512
        wire = self._wire(query, resp, max(512, max_size))
        with self._lock:
            delay = self.delay
            if delay > 0:
                self._outstanding += 1
                self.peak_outstanding = max(self.peak_outstanding, self._outstanding)
        if delay <= 0:
            self._send(sock, wire, peer)
            return
        # Answer later from a timer so queries overlap at the server, the
        # way a slow nameserver makes them overlap: lets a test count how
        # many a client keeps in flight at once.
        timer = threading.Timer(delay, self._send_delayed, args=(sock, wire, peer))
        timer.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()

    def _send_delayed(self, sock: socket.socket, wire: bytes, peer: object) -> None:
        with self._lock:
            self._outstanding -= 1
        self._send(sock, wire, peer)

    @staticmethod
    def _send(sock: socket.socket, wire: bytes, peer: object) -> None:
        try:
            sock.sendto(wire, peer)
        except OSError:
            pass

    def _serve_tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        with conn:
            for _ in range(100):  # bounded: a test client sends a handful
                header = self._recv_exact(conn, 2)
                if header is None:
                    return
                data = self._recv_exact(conn, struct.unpack("!H", header)[0])
                if data is None:
                    return
                try:
                    query = dns.message.from_wire(data)
                except dns.exception.DNSException:
                    return
                resp = self._answer_safely(query, tcp=True)
                if resp is None:
                    continue
                wire = self._wire(query, resp, 65535)
                try:
                    conn.sendall(struct.pack("!H", len(wire)) + wire)
                except OSError:
                    return

    @staticmethod
    def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = conn.recv(n - len(buf))
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def _loop(self) -> None:
        assert self._udp is not None and self._tcp is not None
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "tcp")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=1.0):
                    if key.data == "udp":
                        self._handle_udp(self._udp)
                    elif key.data == "tcp":
                        try:
                            conn, _peer = self._tcp.accept()
                        except OSError:
                            continue
                        t = threading.Thread(target=self._serve_tcp_conn, args=(conn,), daemon=True)
                        t.start()
                        self._workers = [w for w in self._workers if w.is_alive()] + [t]
        finally:
            sel.close()

    def _bind(self) -> None:
        # Same port for UDP and TCP: take an ephemeral UDP port, then try
        # TCP on it; another process may hold that TCP port, so retry a
        # bounded number of times.
        last: OSError | None = None
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind((self.host, port))
                tcp.listen(64)
            except OSError as exc:
                last = exc
                udp.close()
                tcp.close()
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            return
        raise RuntimeError(f"could not bind UDP and TCP on one port: {last}")

    def _probe(self) -> None:
        """Prove the listeners on our port are ours (UDP and TCP both)."""
        import dns.query

        qname = dns.name.Name((secrets.token_hex(4).encode(),)).concatenate(_PROBE_ZONE)
        q = dns.message.make_query(qname, "TXT")
        for send in (dns.query.udp, dns.query.tcp):
            r = send(q, self.host, timeout=2.0, port=self.port)
            if self._probe_token not in r.to_text():
                raise RuntimeError(f"port {self.port} answered by someone else ({send.__name__})")
        with self._lock:
            self._counts.pop((_key(qname), "TXT"), None)
            self._tcp_counts.pop((_key(qname), "TXT"), None)

    def start(self) -> DNSServer:
        for _ in range(5):
            self._bind()
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="test-dns", daemon=True)
            self._thread.start()
            try:
                self._probe()
                return self
            except (RuntimeError, dns.exception.DNSException, OSError):
                self.stop()
        raise RuntimeError("could not start the test DNS server on a port of its own")

    def stop(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for w in self._workers:
            w.join(timeout=5)
        self._workers = []
        for t in self._timers:
            t.cancel()
            t.join(timeout=5)
        self._timers = []
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()
        self._udp = self._tcp = None

    def close(self) -> None:
        self.stop()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def nameserver(self) -> str:
        """``host:port`` for ``DnsConfig(nameservers=[...])``."""
        return f"{self.host}:{self.port}"

    def names(self) -> Iterable[str]:
        with self._lock:
            return sorted({k for k, _ in self._counts})
