"""Merge-field templates: parsed once per campaign, rendered per recipient in ``_core``.

Syntax (a deliberately small language: no code, no attribute access, no loops)::

    Hello {{ first_name }}!                       a field; missing -> error
    Hello {{ first_name | default("friend") }}    default when missing or empty
    {{ name | title }}   {{ code | upper }}   {{ tag | lower }}
    <a href="https://x.example/u?id={{ id | urlencode }}">
    {{ signup | date("%d %B %Y") }}               ISO 8601 value, strftime format
    {{ snippet | raw }}                           HTML part: inserted unescaped

Field names are letters, digits, ``_`` and ``-`` (CSV column names);
filters apply left to right; arguments are string literals in single or
double quotes. ``{{`` always opens a field: a template cannot contain it
literally.

Escaping follows where the field sits, decided once at compile time:

- header: control characters (CR, LF, NUL, VT, ... but TAB) become spaces,
  so no value can start a header;
  non-ASCII becomes RFC 2047 encoded-words (``headers.py``). In address
  headers (``address_header=True``) a field inside ``<...>`` or forming the
  whole value must be one plain address; any other field is a display name,
  made a quoted-string or encoded-words so it cannot add an address.
- HTML text and attribute values: HTML-escaped (``& < > " '``, the entities
  Jinja2/markupsafe use) unless ``| raw``.
- a URL attribute (``href``, ``src``, ...): a field that starts the value is
  a whole URL (unsafe bytes %-encoded, ``&`` and ``'`` escaped for the
  attribute; only http, https, mailto and tel schemes are accepted); a field
  later in the value is a URL component (everything but RFC 3986 unreserved
  characters %-encoded).
- text parts: inserted as is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any

from fastmta.errors import InputError
from fastmta.message import core
from fastmta.message.headers import encode_phrase

Recipient = Mapping[str, Any]

_FIELD_RE = re.compile(r"\{\{(.*?)\}\}", re.S)
_NAME_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_-]*)\s*")
_FILTER_RE = re.compile(r"\s*([A-Za-z_]+)\s*(?:\(\s*(?:\"((?:[^\"\\]|\\.)*)\"|'((?:[^'\\]|\\.)*)')\s*\))?\s*")
FILTERS = frozenset({"default", "upper", "lower", "title", "urlencode", "date", "raw"})
_ARG_REQUIRED = {"default"}
_ARG_OPTIONAL = {"date"}
_URL_ATTRS = frozenset({"href", "src", "action", "formaction", "background", "poster", "cite"})
_URL_SCHEMES = ("http:", "https:", "mailto:", "tel:")
_ATTR_RE = re.compile(r"""([A-Za-z_:][-A-Za-z0-9_:.]*)\s*=\s*(?:"([^"]*)|'([^']*)|([^\s"'>]*))$""")


class Context:
    """Where a template's text goes; decides the escaping of its fields."""

    TEXT = "text"
    HTML = "html"
    HEADER = "header"


@dataclass(frozen=True, slots=True)
class Slot:
    """One ``{{ ... }}``: the field, its filters and the escaping mode chosen by context."""

    field: str
    filters: tuple[tuple[str, str | None], ...]
    mode: int
    line: int
    # In an address header (From, To, ...): "address" for an addr-spec
    # position (inside <...> or the whole value), "phrase" for a display name.
    address_part: str = ""

    @property
    def plain(self) -> bool:
        return not self.filters and not self.address_part


ADDRESS_HEADERS = frozenset({"from", "to", "cc", "bcc", "reply-to", "sender"})
# An addr-spec without specials or spaces. UTF-8 (RFC 6532: "renée@", "@bücher.test")
# is allowed: such a message is sent with SMTPUTF8, or bounced 5.6.7 by a server
# without it, never mangled. Unicode controls and separators are refused below
# (str.isprintable), so nothing can break the header line.
_ADDR_SPEC_RE = re.compile(r"[!#-'*+\-./0-9=?A-Z^-~\u00a1-\U0010ffff]+@[!#-'*+\-./0-9=?A-Z^-~\u00a1-\U0010ffff]+")
_PHRASE_MAX_QUOTED = 200
#: Values remembered per slot (cleared when full: a field of unique values costs a bounded dict).
_MEMO_MAX = 4096
_PHRASE_SPECIALS = frozenset('()<>[]:;@\\,."')


def _safe_phrase(value: str) -> str:
    """A display name as ASCII that cannot split or forge an address list.

    Plain ASCII goes as is, or as a quoted-string when it holds specials
    (RFC 5322 3.2.4); anything else (non-ASCII, controls, long, or shaped
    like an encoded-word) becomes encoded-words, inside which specials are
    inert. Runs of whitespace mean one space in a phrase (RFC 5322 3.2.2).
    """
    value = " ".join(value.translate(_HEADER_UNSAFE).split())
    if value.isascii() and value.isprintable() and "=?" not in value and len(value) <= _PHRASE_MAX_QUOTED:
        if not any(c in _PHRASE_SPECIALS for c in value):
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return encode_phrase(value)


_HEADER_UNSAFE = str.maketrans({"\r": " ", "\n": " ", "\0": " "})


def _unescape_arg(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def _parse_expression(expr: str, *, source: str, line: int) -> tuple[str, tuple[tuple[str, str | None], ...]]:
    parts = _split_pipes(expr)
    m = _NAME_RE.fullmatch(parts[0])
    if not m:
        what = parts[0].strip()
        hint = " (attribute access is not supported)" if "." in what or "[" in what else ""
        raise InputError(f"invalid field name {what!r} in {{{{{expr}}}}}{hint}", source=source, line=line)
    filters: list[tuple[str, str | None]] = []
    for part in parts[1:]:
        fm = _FILTER_RE.fullmatch(part)
        if not fm or fm.group(1) not in FILTERS:
            raise InputError(
                f"unknown or malformed filter {part.strip()!r} in {{{{{expr}}}}}; "
                f"known: {', '.join(sorted(FILTERS))}",
                source=source,
                line=line,
            )
        name = fm.group(1)
        raw_arg = fm.group(2) if fm.group(2) is not None else fm.group(3)
        arg = _unescape_arg(raw_arg) if raw_arg is not None else None
        if name in _ARG_REQUIRED and arg is None:
            raise InputError(f'filter {name} needs an argument, e.g. {name}("...")', source=source, line=line)
        if arg is not None and name not in _ARG_REQUIRED and name not in _ARG_OPTIONAL:
            raise InputError(f"filter {name} takes no argument", source=source, line=line)
        filters.append((name, arg))
    return m.group(1), tuple(filters)


def _split_pipes(expr: str) -> list[str]:
    """Split on ``|`` outside quoted arguments."""
    parts, cur, quote = [], [], ""
    for ch in expr:
        if quote:
            cur.append(ch)
            if ch == quote and (len(cur) < 2 or cur[-2] != "\\"):
                quote = ""
        elif ch in "\"'":
            quote = ch
            cur.append(ch)
        elif ch == "|":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _html_mode(prefix: str) -> tuple[int, bool]:
    """Escaping mode for a field after HTML *prefix*; second item: starts a URL attribute."""
    lt, gt = prefix.rfind("<"), prefix.rfind(">")
    if lt <= gt:
        return core.MODE_HTML, False
    m = _ATTR_RE.search(prefix[lt:])
    if m and m.group(1).lower() in _URL_ATTRS:
        so_far = next(g for g in m.groups()[1:] if g is not None)
        if so_far.strip():
            return core.MODE_URL_COMPONENT, False
        return core.MODE_URL, True
    return core.MODE_HTML, False


class CompiledText:
    """A template string split into pre-encoded literal segments and field slots."""

    def __init__(self, text: str, context: str, *, source: str, address_header: bool = False) -> None:
        self.source = source
        self.context = context
        literals: list[bytes] = []
        slots: list[Slot] = []
        pos = 0
        html_prefix: list[str] = []
        for m in _FIELD_RE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            literal = text[pos : m.start()]
            literals.append(literal.encode("utf-8"))
            html_prefix.append(literal)
            field, filters = _parse_expression(m.group(1), source=source, line=line)
            names = [f for f, _ in filters]
            if context == Context.HEADER:
                mode = core.MODE_HEADER
            elif context == Context.TEXT or "raw" in names:
                mode = core.MODE_TEXT
            else:
                mode, _ = _html_mode("".join(html_prefix))
                if mode in (core.MODE_URL, core.MODE_URL_COMPONENT) and "urlencode" in names:
                    mode = core.MODE_HTML  # already %-encoded; only HTML escaping left (a no-op)
            part = ""
            if context == Context.HEADER and address_header:
                before = "".join(html_prefix)
                whole = not literal.strip() and not text[m.end() :].strip() and not slots
                part = "address" if whole or before.rfind("<") > before.rfind(">") else "phrase"
            slots.append(Slot(field, filters, mode, line, part))
            html_prefix.append("x")  # a field's value is opaque text for context purposes
            pos = m.end()
        rest = text[pos:]
        unclosed = rest.find("{{")
        if unclosed >= 0:
            raise InputError(
                "'{{' without a closing '}}'", source=source, line=text.count("\n", 0, pos + unclosed) + 1
            )
        literals.append(rest.encode("utf-8"))
        self.literals: tuple[bytes, ...] = tuple(literals)
        self.slots: tuple[Slot, ...] = tuple(slots)
        self.modes = bytes(s.mode for s in slots)
        self.fields = frozenset(s.field for s in slots)
        # A slot with filters or an address check is a pure function of its field's value (an error
        # is raised, never kept): remembered per value, as first names, dates and defaults repeat
        # across a campaign's rows. One memory per kind of slot (field, filters, checks), shared by
        # its repeats: a field used 250 times in a newsletter is worked out once a row, and the memory
        # stays bounded by the kinds, not the slots. A plain slot's value is used as it is.
        kinds: dict[tuple[str, tuple[tuple[str, str | None], ...], int, str], dict[str, str]] = {}
        self._memos: tuple[dict[str, str] | None, ...] = tuple(
            None if s.plain and s.mode != core.MODE_URL else kinds.setdefault((s.field, s.filters, s.mode, s.address_part), {})
            for s in slots
        )
        # Fast path: no filters anywhere -> one C-level itemgetter call fetches every value.
        self._getter: Callable[[Recipient], Any] | None = None
        # (URL-starting fields take the general path: their scheme is checked.)
        if slots and all(s.plain and s.mode != core.MODE_URL for s in slots):
            names = [s.field for s in slots]
            if len(names) == 1:
                single = itemgetter(names[0])
                self._getter = lambda r: (single(r),)
            else:
                self._getter = itemgetter(*names)

    def render(self, recipient: Recipient, *, recipient_id: str | None = None) -> bytes:
        """This text for one recipient: UTF-8 bytes, every field escaped for its context."""
        if not self.slots:
            return self.literals[0]
        if self._getter is not None:
            try:
                values = self._getter(recipient)
                return core.render(self.literals, self.modes, values)
            except (KeyError, TypeError):
                pass  # a missing or non-str value: the general path explains or converts
        values = []
        for slot, memo in zip(self.slots, self._memos, strict=True):
            raw = recipient.get(slot.field)
            if memo is None or raw.__class__ is not str:
                values.append(self._value(slot, recipient, recipient_id))
                continue
            value = memo.get(raw)
            if value is None:
                value = self._value(slot, recipient, recipient_id)
                if len(memo) >= _MEMO_MAX:
                    memo.clear()
                memo[raw] = value
            values.append(value)
        return core.render(self.literals, self.modes, values)

    def _fail(self, slot: Slot, recipient: Recipient, recipient_id: str | None, reason: str) -> InputError:
        rid = recipient_id if recipient_id is not None else recipient.get("email", "?")
        return InputError(f"recipient {rid}: field {slot.field!r}: {reason}", source=self.source, line=slot.line)

    def _value(self, slot: Slot, recipient: Recipient, recipient_id: str | None) -> str:
        raw = recipient.get(slot.field)
        value: str | None = None if raw is None else raw if isinstance(raw, str) else str(raw)
        for name, arg in slot.filters:
            if name == "default":
                if not value:
                    value = arg
                continue
            if name == "raw":
                continue
            if value is None:
                break
            if name == "upper":
                value = value.upper()
            elif name == "lower":
                value = value.lower()
            elif name == "title":
                value = value.title()
            elif name == "urlencode":
                value = core.escape(value, core.MODE_URL_COMPONENT).decode("ascii")
            elif name == "date":
                try:
                    when = datetime.fromisoformat(value.strip())
                except ValueError:
                    raise self._fail(slot, recipient, recipient_id, f"{value!r} is not an ISO 8601 date") from None
                value = when.strftime(arg or "%Y-%m-%d")
        if value is None:
            raise self._fail(slot, recipient, recipient_id, "missing (and no default)")
        if slot.address_part == "address":
            if not _ADDR_SPEC_RE.fullmatch(value) or not value.isprintable():
                raise self._fail(slot, recipient, recipient_id, f"{value[:60]!r} is not a single email address")
        elif slot.address_part == "phrase":
            value = _safe_phrase(value)
        if slot.mode == core.MODE_URL:
            scheme = value.lstrip()[:7].lower()
            if ":" in value.split("/", 1)[0] and not scheme.startswith(_URL_SCHEMES):
                raise self._fail(slot, recipient, recipient_id, f"URL scheme not allowed in {value[:40]!r}")
        return value
