"""The HTML part read by a real HTML5 parser (html5lib): parse errors, unclosed tags, links, images, text.

html5lib implements the WHATWG parsing algorithm, the one browsers and
webmail clients use, so what it calls an error (a misnested ``</b>``, an end
tag that closes nothing, a table cell outside a table, an element still open
at the end) is what each client repairs in its own way. Its ``(line,
column)`` positions are those of the rendered part, which for a campaign
template file are the file's own lines (merge fields never hold a line break).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import html5lib
from html5lib.constants import E as _MESSAGES

__all__ = ["Anchor", "HtmlInfo", "parse_html"]

#: Elements the parser closes by itself at the end (an end tag is optional for
#: them, HTML 13.1.2.4): left open, they are not an error of the author.
_IMPLIED_END = frozenset({
    "html", "head", "body", "p", "li", "dd", "dt", "option", "optgroup", "rb", "rt", "rtc", "rp",
    "tbody", "thead", "tfoot", "tr", "td", "th", "colgroup", "caption",
})
#: Parse errors that every client shrugs off: reported as information only.
_HARMLESS = frozenset({
    "expected-doctype-but-got-start-tag", "expected-doctype-but-got-chars", "expected-doctype-but-got-eof",
    "unknown-doctype",
})
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Anchor:
    href: str
    text: str
    line: int | None


@dataclass
class HtmlInfo:
    errors: list[tuple[int, int, str]] = field(default_factory=list)  # (line, column, message)
    notes: list[tuple[int, int, str]] = field(default_factory=list)  # harmless parse errors
    unclosed: list[str] = field(default_factory=list)  # element names still open at the end
    anchors: list[Anchor] = field(default_factory=list)
    images: list[tuple[str, int | None]] = field(default_factory=list)  # (src, line)
    text: str = ""  # the visible text, whitespace collapsed

    @property
    def words(self) -> int:
        return len(self.text.split())


def _message(code: str, data: dict[str, Any] | None) -> str:
    template = _MESSAGES.get(code)
    if template is None:
        return code
    try:
        return str(template % (data or {}))
    except (KeyError, TypeError, ValueError):
        return str(template)


def _line_of(source: str, needle: str) -> int | None:
    """The line where *needle* first occurs in *source* (links and images carry no position in the tree)."""
    at = source.find(needle) if needle else -1
    return source.count("\n", 0, at) + 1 if at >= 0 else None


def _text(element: Any) -> str:
    return _SPACE.sub(" ", "".join(element.itertext())).strip()


def parse_html(source: str) -> HtmlInfo:
    """Everything the checks need from one HTML document."""
    parser = html5lib.HTMLParser(strict=False, namespaceHTMLElements=False)
    root = parser.parse(source)
    info = HtmlInfo()
    for (line, column), code, data in parser.errors:
        entry = (int(line), int(column), _message(code, data))
        (info.notes if code in _HARMLESS else info.errors).append(entry)
    # The tree builder's stack of open elements, as the end of the input left it.
    open_elements = getattr(parser.tree, "openElements", [])
    info.unclosed = [e.name for e in open_elements if getattr(e, "name", None) and e.name not in _IMPLIED_END]
    for element in root.iter():
        tag = element.tag if isinstance(element.tag, str) else ""
        if tag in ("a", "area"):
            href = (element.get("href") or "").strip()
            if href:
                info.anchors.append(Anchor(href, _text(element) if tag == "a" else element.get("alt") or "",
                                           _line_of(source, element.get("href") or "")))
        elif tag == "img":
            src = (element.get("src") or "").strip()
            info.images.append((src, _line_of(source, element.get("src") or "")))
    body = root.find("body")
    if body is not None:
        for dead in list(body.iter("script")) + list(body.iter("style")):
            dead.text = ""
        info.text = _text(body)
    return info
