"""The test DNS server answers like an authoritative server should (checked with plain dns.query)."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from dnsserver import DNSServer


def ask(ns: DNSServer, name: str, rdtype: str, *, tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(q, ns.host, timeout=2.0, port=ns.port)


def test_answers_nodata_nxdomain_and_refusal() -> None:
    with DNSServer({"z.test": "a.b A 127.0.0.1\nc CNAME a.b"}, soa_minimum=42) as ns:
        found = ask(ns, "a.b.z.test", "A")
        assert found.rcode() == dns.rcode.NOERROR and found.flags & dns.flags.AA
        assert [rr.to_text() for rr in found.answer] == ["a.b.z.test. 300 IN A 127.0.0.1"]
        # b.z.test has a child but no records: it exists (NODATA), it is not NXDOMAIN.
        ent = ask(ns, "b.z.test", "A")
        assert ent.rcode() == dns.rcode.NOERROR and not ent.answer
        assert ent.authority[0].rdtype == dns.rdatatype.SOA and ent.authority[0][0].minimum == 42
        nx = ask(ns, "nope.z.test", "A")
        assert nx.rcode() == dns.rcode.NXDOMAIN and nx.authority[0].rdtype == dns.rdatatype.SOA
        chain = ask(ns, "c.z.test", "A", tcp=True)
        assert [rr.rdtype for rr in chain.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
        assert ask(ns, "elsewhere.test", "A").rcode() == dns.rcode.REFUSED
        assert ns.count("a.b.z.test", "A") == 1 and ns.count("c.z.test", tcp=True) == 1
        assert ns.total() == 5


def test_runtime_changes_and_faults() -> None:
    with DNSServer({"z.test": "h A 127.0.0.1"}) as ns:
        ns.set_records("h.z.test", "A", "127.0.0.2", "127.0.0.3", ttl=5)
        assert sorted(rr.to_text() for rr in ask(ns, "h.z.test", "A").answer[0]) == ["127.0.0.2", "127.0.0.3"]
        assert ask(ns, "h.z.test", "A").answer[0].ttl == 5
        ns.truncate("h.z.test")
        udp = ask(ns, "h.z.test", "A")
        assert udp.flags & dns.flags.TC and not udp.answer
        assert ask(ns, "h.z.test", "A", tcp=True).answer
        ns.heal()
        ns.servfail("h.z.test", "A")
        assert ask(ns, "h.z.test", "A").rcode() == dns.rcode.SERVFAIL
        assert ask(ns, "h.z.test", "AAAA").rcode() == dns.rcode.NOERROR  # only A fails
        ns.heal("h.z.test")
        ns.delete_name("h.z.test")
        assert ask(ns, "h.z.test", "A").rcode() == dns.rcode.NXDOMAIN
        ns.remove_zone("z.test")
        assert ask(ns, "h.z.test", "A").rcode() == dns.rcode.REFUSED
        assert ns.errors == []
