"""Content checks on the rendered message: its parts, HTML, links, images, size and unsubscribe link.

* a text/plain alternative beside the HTML (multipart/alternative): mail
  without one is scored as spam (SpamAssassin's MIME_HTML_ONLY) and unread by
  text-only clients;
* HTML parsed by html5lib (:mod:`fastmta.check.html`): its parse errors and
  the elements left unclosed or misnested;
* links and image sources (:mod:`fastmta.check.links`): numeric IP hosts,
  URL shorteners, link text showing another domain than the link's;
* image-only mail: images with next to no text (:data:`MIN_WORDS`) is what
  image spam looks like to a filter;
* size: Gmail clips a message over about 102 KB behind "View entire
  message" (taking the unsubscribe link and the open-tracking pixel with it):
  a warning over :data:`CLIP_BYTES`;
* a visible unsubscribe link in the body (Gmail's and Yahoo's bulk rules
  ask for one beside the List-Unsubscribe header).
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

from fastmta.check.dnsquery import aligned
from fastmta.check.headers import check_headers
from fastmta.check.html import HtmlInfo, parse_html
from fastmta.check.links import link_host, numeric_host, shortener, shown_domain, text_urls
from fastmta.check.report import Report
from fastmta.check.sample import Sample

__all__ = ["CLIP_BYTES", "MIN_WORDS", "check_content"]

CLIP_BYTES = 100 * 1024
MIN_WORDS = 30  # fewer visible words than this beside an image: image-only mail
_MAX_HTML_ERRORS = 10
_UNSUBSCRIBE_WORDS = (
    "unsubscribe", "opt-out", "opt out", "optout", "abmelden", "abbestellen", "désinscri", "desinscri",
    "désabonner", "desabonner", "darse de baja", "cancelar suscripción", "annulla iscrizione", "afmelden",
    "email preferences", "manage preferences", "manage your subscription",
)


def _parts(msg: EmailMessage, report: Report) -> tuple[str | None, str | None]:
    text: str | None = None
    html: str | None = None
    for part in msg.walk():
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            continue
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"):
            continue
        try:
            content = part.get_content()
        except Exception as exc:  # an unknown charset or a broken encoding: report it, judge the rest
            report.warning("content", f"the {ctype} part cannot be decoded: {exc}", ctype)
            continue
        if not isinstance(content, str):
            continue
        if ctype == "text/plain" and text is None:
            text = content
        elif ctype == "text/html" and html is None:
            html = content
    return text, html


def _link(report: Report, url: str, where: str, what: str, shown: str | None = None) -> bool:
    """Findings for one link or image source; True when it has none."""
    host = link_host(url)
    if host is None:
        return True
    if numeric_host(host):
        report.error("links", f"{what} to a numeric IP address: {url[:120]}", where)
        return False
    if shortener(host):
        report.warning("links", f"{what} through the URL shortener {host}: {url[:120]}", where)
        return False
    if shown and not aligned(shown, host):
        report.warning("links", f"link text shows {shown} but the link goes to {host}", where)
        return False
    return True


def _html(sample: Sample, info: HtmlInfo, report: Report) -> None:
    where = sample.where_html
    for line, column, message in info.errors[:_MAX_HTML_ERRORS]:
        report.warning("html", f"HTML parse error: {message} (column {column})", f"{where}:{line}")
    if len(info.errors) > _MAX_HTML_ERRORS:
        report.warning("html", f"{len(info.errors) - _MAX_HTML_ERRORS} more HTML parse errors", where)
    for line, _column, message in info.notes[:3]:
        report.info("html", message, f"{where}:{line}")
    if info.unclosed:
        shown = ", ".join(f"<{name}>" for name in info.unclosed)
        report.warning("html", f"elements never closed: {shown}", where)
    if not info.errors and not info.unclosed:
        report.ok("html", "the HTML parses without errors (html5lib, the HTML5 algorithm)", where)
    clean = True
    for anchor in info.anchors:
        spot = f"{where}:{anchor.line}" if anchor.line else where
        clean &= _link(report, anchor.href, spot, "link", shown_domain(anchor.text))
    for src, src_line in info.images:
        clean &= _link(report, src, f"{where}:{src_line}" if src_line else where, "image")
    if clean:
        report.ok("links", f"{len(info.anchors)} link(s), {len(info.images)} image(s): no numeric IP, "
                  "no URL shortener, no link text showing another domain", where)
    if info.images and info.words < MIN_WORDS:
        report.warning("content", f"image-only mail: {len(info.images)} image(s) and {info.words} word(s) of text; "
                       f"filters want text (at least {MIN_WORDS} words)", where)


def _unsubscribe_link(sample: Sample, text: str | None, info: HtmlInfo | None, report: Report) -> None:
    haystacks = [(text or "").lower()]
    if info is not None:
        haystacks.append(info.text.lower())
        haystacks += [f"{a.href} {a.text}".lower() for a in info.anchors]
    if any(word in hay for hay in haystacks for word in _UNSUBSCRIBE_WORDS):
        report.ok("unsubscribe", "the body has an unsubscribe link", "body", "unsubscribe")
    elif sample.campaign:
        report.warning("unsubscribe", "no unsubscribe link in the body: bulk mail must show one", "body", "unsubscribe")
    else:
        report.info("unsubscribe", "no unsubscribe link in the body (needed if this is bulk mail)", "body")


def check_content(sample: Sample, report: Report) -> None:
    """Every content and header check on *sample*."""
    msg = email.message_from_bytes(sample.message, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    check_headers(sample, msg, report)
    size = len(sample.message)
    if size > CLIP_BYTES:
        report.warning("content", f"the message is {size / 1024:.0f} KB: Gmail clips mail over about 102 KB "
                       "(the unsubscribe link and tracking pixel with it)", "")
    else:
        report.ok("content", f"size {size / 1024:.1f} KB (under Gmail's clipping at 102 KB)", "")
    text, html = _parts(msg, report)
    if text is None and html is None:
        report.error("content", "no text/plain or text/html part", "")
    elif html is not None and text is None:
        report.warning("content", "HTML without a text/plain alternative (multipart/alternative)", sample.where_html)
    elif html is not None:
        report.ok("content", "text/plain and text/html alternatives", "")
    info = parse_html(html) if html is not None else None
    if info is not None:
        _html(sample, info, report)
    if text is not None:
        for url, line in text_urls(text):
            _link(report, url, f"{sample.where_text}:{line}", "link")
    _unsubscribe_link(sample, text, info, report)
