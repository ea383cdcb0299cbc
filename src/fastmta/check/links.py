"""Links and image sources that filters hold against a message.

* a host that is a numeric IP address (``http://192.0.2.7/``, also the
  decimal, octal and hexadecimal spellings browsers accept, ``http://3221225991/``):
  legitimate senders link to names; SpamAssassin's NUMERIC_HTTP_ADDR and
  every provider's filter score it;
* a URL shortener (:data:`SHORTENERS`): it hides the destination, which is
  why spammers use them and filters distrust them; link to your own domain
  (a branded short domain of your own is fine: it is not on the list);
* link text that shows a domain (``www.bank.example``,
  ``https://bank.example/login``) other than the one the link goes to, the
  mark of phishing (compared by organizational domain, so
  ``example.com`` -> ``click.example.com`` is not a mismatch).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from fastmta.check.dnsquery import known_suffix

__all__ = ["SHORTENERS", "link_host", "numeric_host", "shortener", "shown_domain"]

#: Common public URL shorteners (generic services whose links anyone can
#: make). Brand-owned short domains that only their owner's links use
#: (youtu.be, amzn.to) are not listed.
SHORTENERS: frozenset[str] = frozenset({
    "bit.ly", "bitly.com", "j.mp", "tinyurl.com", "t.co", "goo.gl", "ow.ly", "is.gd", "v.gd", "buff.ly",
    "rebrand.ly", "cutt.ly", "shorturl.at", "rb.gy", "t.ly", "tiny.cc", "bl.ink", "s.id", "qr.ae",
    "adf.ly", "soo.gd", "clck.ru", "shorte.st", "tr.im", "x.co", "po.st", "su.pr", "bc.vc", "lnkd.in",
    "1url.com", "urlz.fr", "shrtco.de", "tiny.one", "short.io", "t2m.io", "snip.ly", "mcaf.ee",
})

_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"')\]]+", re.I)
_DOMAIN = re.compile(r"\b((?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]*[a-z0-9])\b", re.I)
#: What a browser reads as an IPv4 address: 1 to 4 parts, each decimal, octal (0...) or hex (0x...).
_NUMERIC_V4 = re.compile(r"^(?:(?:0x[0-9a-f]+|[0-9]+)\.){0,3}(?:0x[0-9a-f]+|[0-9]+)\.?$", re.I)


def link_host(url: str) -> str | None:
    """The host of an http(s) URL (or a bare ``www.`` one), lower case; None for other schemes."""
    url = url.strip()
    if url.lower().startswith("www."):
        url = "http://" + url
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https"):
        return None
    try:
        host = parts.hostname
    except ValueError:
        return None
    return host.rstrip(".").lower() if host else None


def numeric_host(host: str) -> bool:
    """Whether *host* is an IP address in any spelling a browser takes."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        pass
    return bool(_NUMERIC_V4.match(host))


def shortener(host: str) -> bool:
    return host in SHORTENERS or (host.startswith("www.") and host[4:] in SHORTENERS)


def shown_domain(text: str) -> str | None:
    """The domain a link's text shows to the reader (a URL or a bare domain name), if any."""
    text = text.strip()
    m = _URL.search(text)
    if m:
        host = link_host(m.group())
        if host:
            return host
    m = _DOMAIN.search(text)
    if m is None:
        return None
    candidate = m.group(1).lower()
    # "file.txt" or "v1.2" are not domains: a known public suffix is needed.
    return candidate if known_suffix(candidate) and "." in candidate else None


def text_urls(text: str) -> list[tuple[str, int]]:
    """(url, line) of every http(s) or www. URL in plain text."""
    found = []
    for m in _URL.finditer(text):
        found.append((m.group().rstrip(".,;:!?"), text.count("\n", 0, m.start()) + 1))
    return found
