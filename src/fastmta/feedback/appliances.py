"""Filtering appliances and cloud mail gateways, recognised by what they say about themselves.

A corporate domain's MX is often not its mail server but a filter in front
of it (Proofpoint, Mimecast, Barracuda, Cisco Secure Email, ...). What such
a filter says about a recipient is worth less than what a mailbox server
says: many of them refuse mail they do not like with the words of an
address error ("550 5.1.1 user unknown"), typically after scanning the
content. Knowing that the server is one of them is one of the signals
:mod:`fastmta.delivery.filter_watch` weighs before it calls an address bad.

They are recognised from their host names (the MX name, and the name in the
greeting and EHLO banner: ``mx0a-001.pphosted.com``), from product words in
banners and reply texts, and from reply formats peculiar to one product
(Cisco's enhanced code behind a ``#``, Exchange Online Protection's
``AS(nnnn)`` tags). The table below is written from the vendors' published
host names and reply formats; it is data, extendable by appending.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from fastmta.smtp.reply import Reply

__all__ = ["APPLIANCES", "Appliance", "identify", "identify_server"]


@dataclass(frozen=True, slots=True)
class Appliance:
    """One product: the domains its hosts live under, and the marks its texts carry."""

    name: str
    #: Host name suffixes (an MX name or a banner's host name ends in one of them).
    hosts: tuple[str, ...]
    #: Regular expressions (case-insensitive) found in banners and reply texts.
    marks: tuple[str, ...] = ()
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A host suffix counts at a label boundary only ("xpphosted.com" is not Proofpoint's).
        hosts = [rf"(?:^|[^a-z0-9-])(?:[a-z0-9-]+\.)*{re.escape(h)}(?![a-z0-9-])" for h in self.hosts]
        object.__setattr__(self, "pattern", re.compile("|".join([*hosts, *self.marks]), re.IGNORECASE))


APPLIANCES: tuple[Appliance, ...] = (
    Appliance("Proofpoint", ("pphosted.com", "ppe-hosted.com", "proofpoint.com"), (r"\bproofpoint\b",)),
    Appliance("Mimecast", ("mimecast.com", "mimecast-offshore.com", "mimecast.co.za"), (r"\bmimecast\b",)),
    Appliance(
        "Barracuda", ("barracudanetworks.com", "barracuda.com", "cudasvc.com"),
        (r"\bbarracuda\b", r"\bcuda_nsu\b"),  # "550 cuda_nsu 5.1.1 ..." (no such user)
    ),
    Appliance(
        "Cisco Secure Email (IronPort)", ("iphmx.com", "ironport.com"),
        # AsyncOS writes the enhanced code behind a '#' ("550 #5.1.0 Address rejected"); qmail's
        # "(#5.1.1)" is in parentheses and does not count.
        (r"\bironport\b", r"\basyncos\b", r"(?:^|\s)#[245]\.\d{1,3}\.\d{1,3}\b"),
    ),
    Appliance(
        "Symantec MessageLabs", ("messagelabs.com", "symanteccloud.com"),
        (r"\bmessagelabs\b", r"\bbrightmail\b", r"\bsymantec\b"),
    ),
    Appliance(
        "Trend Micro", ("trendmicro.com", "trendmicro.eu", "tmes.trendmicro.com"),
        (r"\btrend ?micro\b", r"\binterscan\b", r"\bimss\b"),
    ),
    Appliance("Sophos", ("sophos.com", "reflexion.net"), (r"\bsophos\b",)),
    Appliance("FortiMail", ("fortimail.com", "fortimailcloud.com"), (r"\bfortimail\b", r"\bfortinet\b")),
    Appliance(
        "Microsoft EOP", ("mail.protection.outlook.com",),
        # Exchange Online Protection tags its replies with AS(number) (e.g. directory-based
        # edge blocking); consumer Outlook.com's olc.protection.outlook.com is not a filter
        # in front of a company and is not listed.
        (r"\bAS\(\d{4,}\)",),
    ),
)


@lru_cache(maxsize=4096)
def identify(text: str) -> str | None:
    """The appliance *text* (a host name, banner or reply text) names, or None."""
    if not text:
        return None
    for appliance in APPLIANCES:
        if appliance.pattern.search(text):
            return appliance.name
    return None


def identify_server(host: str | None, *replies: Reply | None) -> str | None:
    """The appliance a connection talks to, from its MX *host* name and session *replies*
    (greeting: every line; EHLO reply: the first line, the rest are its keywords)."""
    if host:
        found = identify(host.rstrip(".").lower())
        if found is not None:
            return found
    for reply in replies:
        if reply is not None and reply.lines:
            found = identify(" ".join(reply.lines) if reply.code == 220 else reply.lines[0])
            if found is not None:
                return found
    return None
