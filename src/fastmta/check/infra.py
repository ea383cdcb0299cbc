"""Infrastructure: reverse DNS of the egress IPs, and TLS at the recipients' mail servers.

**PTR**: each egress IP needs a PTR record whose name resolves (A/AAAA) back
to the IP ("forward-confirmed reverse DNS", FCrDNS): Gmail and Yahoo refuse
bulk mail from IPs without it. The source's EHLO name should be that name.

**TLS**: Gmail requires bulk mail to travel over TLS. For the N domains with
most recipients, the first MX host (lowest preference; the domain itself
when it has no MX, RFC 5321 5.1) is asked over a real SMTP connection: greeting,
EHLO, and when STARTTLS is offered, the TLS handshake itself (certificates
are not verified, as between MTAs in opportunistic mode). The port is 25
unless the caller says otherwise (tests point it at a local sink); every
step has a timeout.
"""

from __future__ import annotations

import smtplib
import ssl
from collections import Counter

from fastmta.check.dnsquery import DnsFailure, Lookup, same_ip
from fastmta.check.report import Report

__all__ = ["check_ptr", "check_tls"]


def check_ptr(lookup: Lookup, ips: list[tuple[str, str]], report: Report) -> None:
    """PTR and forward confirmation of each (IP, EHLO name); an empty EHLO name is not compared."""
    for ip, helo in ips:
        where = f"DNS PTR {ip}"
        try:
            names = lookup.ptr(ip)
        except DnsFailure as exc:
            report.warning("ptr", f"cannot look up the PTR of {ip}: {exc}", where, "ptr")
            continue
        if not names:
            report.error("ptr", f"no PTR record for {ip}: receivers refuse mail from IPs without reverse DNS",
                         where, "ptr")
            continue
        confirmed = []
        for name in names:
            try:
                if any(same_ip(a, ip) for a in lookup.addresses(name)):
                    confirmed.append(name)
            except DnsFailure as exc:
                report.warning("ptr", f"cannot look up {name}: {exc}", f"DNS {name} A/AAAA", "ptr")
        if confirmed:
            report.ok("ptr", f"{ip} -> {confirmed[0]} -> {ip} (forward-confirmed)", where, "ptr")
        else:
            report.error("ptr", f"the PTR name {names[0]} of {ip} does not resolve back to {ip}", where, "ptr")
        if helo and (helo.lower() == "localhost" or helo.lower().endswith(".localdomain")):
            report.warning("ptr", f"the source with {ip} says EHLO {helo}: set [[sources]] ehlo_name to its "
                           f"PTR name", "configuration")
        elif helo and confirmed and helo.lower().rstrip(".") not in confirmed:
            report.warning("ptr", f"the EHLO name {helo} of {ip} is not its PTR name {confirmed[0]}", "configuration")


def _probe(address: str, port: int, helo: str, timeout: float) -> tuple[bool, str]:
    """(STARTTLS offered, what happened) for one SMTP server; OSError / SMTPException when it cannot be asked."""
    with smtplib.SMTP(address, port, local_hostname=helo, timeout=timeout) as smtp:
        code, _ = smtp.ehlo()
        if code != 250:
            return False, f"EHLO answered {code}"
        if not smtp.has_extn("starttls"):
            return False, "STARTTLS not offered"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        smtp.starttls(context=context)
        sock = smtp.sock
        version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
        return True, f"STARTTLS offered, handshake {version or 'done'}"


def check_tls(
    lookup: Lookup,
    domains: Counter[str],
    report: Report,
    *,
    top: int = 3,
    port: int = 25,
    timeout: float = 10.0,
    helo: str = "localhost",
) -> None:
    """Ask the first MX of each of the *top* recipient domains for STARTTLS."""
    if not domains:
        report.info("tls", "no recipient domain to probe", "")
        return
    for domain, count in domains.most_common(top):
        where = f"DNS {domain} MX"
        try:
            mx = lookup.mx(domain)
        except DnsFailure as exc:
            report.warning("tls", f"cannot look up the MX of {domain}: {exc}", where, "tls")
            continue
        if mx and mx[0][1] in ("", "."):
            report.error("tls", f"{domain} ({count} recipients) accepts no mail (null MX, RFC 7505)", where)
            continue
        host = mx[0][1] if mx else domain
        try:
            addresses = lookup.addresses(host)
        except DnsFailure as exc:
            report.warning("tls", f"cannot look up {host}: {exc}", f"DNS {host} A/AAAA", "tls")
            continue
        if not addresses:
            report.error("tls", f"the mail server {host} of {domain} has no address", f"DNS {host} A/AAAA")
            continue
        target = f"{host}[{addresses[0]}]:{port}"
        try:
            offered, what = _probe(addresses[0], port, helo, timeout)
        except (OSError, smtplib.SMTPException) as exc:
            report.warning("tls", f"{domain}: cannot ask {target}: {exc or type(exc).__name__}", target, "tls")
            continue
        if offered:
            report.ok("tls", f"{domain} ({count} recipients): {host} {what}", target, "tls")
        else:
            report.warning("tls", f"{domain} ({count} recipients): {host}: {what}; mail would go unencrypted",
                           target, "tls")
