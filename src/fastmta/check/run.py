"""Running every check on one input: :func:`check_path` and :func:`check_campaign`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from fastmta.check.auth import check_auth
from fastmta.check.content import check_content
from fastmta.check.dnsquery import Lookup
from fastmta.check.infra import check_ptr, check_tls
from fastmta.check.report import Report
from fastmta.check.sample import load_sample
from fastmta.check.spamassassin import check_spamassassin
from fastmta.delivery.config import Config

__all__ = ["CheckOptions", "check_campaign", "check_path", "egress_ips"]


@dataclass(frozen=True)
class CheckOptions:
    #: Egress IPs to check SPF and PTR for; empty: the configuration's ``[[sources]] address`` values.
    ips: tuple[str, ...] = ()
    #: Envelope sender of a message without one (a pickup file's X-Sender and a campaign's sender win).
    sender: str | None = None
    #: DNS checks (SPF, DKIM, DMARC, PTR, MX/TLS); off: content only.
    dns: bool = True
    #: Connect to the recipients' mail servers for the STARTTLS probe.
    smtp_probe: bool = True
    smtp_port: int = 25
    smtp_timeout: float = 10.0
    #: How many of the domains with most recipients are probed.
    top_domains: int = 3
    #: Run SpamAssassin on the sample when it is installed.
    spamassassin: bool = True


def egress_ips(config: Config, options: CheckOptions) -> list[tuple[str, str]]:
    """(IP, EHLO name) pairs: the given IPs (EHLO unknown: ""), else each configured source with an address."""
    if options.ips:
        return [(str(ipaddress.ip_address(ip)), "") for ip in options.ips]
    return [(s.address, s.ehlo_name) for s in config.sources if s.address]


def check_path(path: Path, config: Config, options: CheckOptions | None = None) -> Report:
    """Check a campaign job (``*.toml``), a pickup file or a message; synchronous (DNS and SMTP block)."""
    options = options or CheckOptions()
    report = Report(str(path), "campaign" if path.suffix.lower() == ".toml" else "message")
    sample = load_sample(path, config, report, sender=options.sender, count_domains=options.smtp_probe and options.dns)
    if sample is None:
        return report
    ips = egress_ips(config, options)
    report.facts.update({
        "envelope sender": sample.sender or "<>",
        "From domain": sample.from_domain or "?",
        "DKIM keys": ", ".join(f"{k.selector}._domainkey.{k.domain}" for k in sample.keys) or "none",
        "egress IPs": ", ".join(ip for ip, _ in ips) or "none given",
        "size": f"{len(sample.message)} bytes",
    })
    check_content(sample, report)
    if options.dns:
        lookup = Lookup(config.dns)
        check_auth(sample, lookup, ips, report)
        if ips:
            check_ptr(lookup, ips, report)
        else:
            report.warning("ptr", "no egress IP known (give --ip, or [[sources]] address): PTR not checked", "")
        if config.smtp.tls == "never":
            report.error("tls", "[smtp] tls = \"never\": mail goes unencrypted; Gmail requires TLS", "configuration",
                         "tls")
        if options.smtp_probe:
            helo = next((h for _, h in ips if h and h != "localhost"), "localhost")
            check_tls(lookup, sample.domains, report, top=options.top_domains, port=options.smtp_port,
                      timeout=options.smtp_timeout, helo=helo)
        else:
            report.info("tls", "skipped: no SMTP connections (--no-network-smtp)", "")
    else:
        report.info("dns", "skipped: SPF, DKIM, DMARC, PTR and TLS (--no-dns)", "")
    if options.spamassassin:
        check_spamassassin(sample.message, sample.sender, report)
    return report


def check_campaign(path: Path, config: Config, options: CheckOptions | None = None) -> Report:
    """Check a campaign job before it starts (what ``send``/``serve`` call): errors should refuse it."""
    return check_path(path, config, options)
