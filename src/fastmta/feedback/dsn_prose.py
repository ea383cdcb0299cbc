"""Reading bounces written as prose, with one small table row per MTA family.

A family (:class:`ProseFormat`, rows in :mod:`fastmta.feedback.dsn_formats`)
says how to recognise its reports and where their recipients are: marker
phrases, the line that opens the recipient list, the line shapes that name a
recipient (regex group ``a``; group ``d`` for a reason on the same line),
where the returned original begins, and the wording of a delay warning.
:func:`read_prose` tries every family whose markers occur, in table order,
and keeps the first that names a recipient. The lines between one
recipient and the next are its diagnostic (or, for ``reason_first``
families, the lines before it); the reply code and status come out of that
text through :mod:`fastmta.feedback.dsn_codes`, never from the rest of the
report.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from fastmta.feedback.dsn_codes import ADDRESS, is_address
from fastmta.feedback.dsn_record import DSNRecipient, make_recipient

__all__ = ["ADDR", "COMMON_END", "Found", "ProseFormat", "compile_formats", "html_to_text", "read_prose", "to_records", "unquote"]

_FLAGS = re.IGNORECASE | re.MULTILINE

#: Lines where the returned original (or its headers) starts, in any family.
COMMON_END = (
    r"^\s*-{2,}\s*(?:Below this line is a copy of the message|Enclosed is a copy of the message"
    r"|Original message follows|This is a copy of (?:the|your) message|The header of the original message"
    r"|Original message|Unsent message follows|Returned Message|Message text follows|original message"
    r"|original mail info|Message header follows|Original message header)",
    r"^\s*(?:Original message follows\.?|Message headers follow\.?|Below is a copy of the original message:?"
    r"|Included is a copy of the message header:?|Original message headers:|Original Message Headers)\s*$",
    r"^\|-+ *Message text follows",
    r"^(?:Return-Path|Received|DKIM-Signature|ARC-Seal|X-Received|Authentication-Results|Delivered-To):[ \t]",
)


@dataclass(frozen=True, slots=True)
class ProseFormat:
    """How one MTA family writes its bounces (see the module notes)."""

    name: str
    markers: tuple[str, ...]
    rcpt: tuple[str, ...]
    begin: str | None = None
    end: tuple[str, ...] = ()
    delayed: str | None = None
    reason_first: bool = False
    skip: str | None = None  # a notice that names no failed recipient (a success report)


@dataclass(slots=True)
class Found:
    """One recipient read from prose, before it becomes a record."""

    address: str | None  # None: the report names it by something else (a local part, a pipe)
    hint: str
    diag: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Compiled:
    fmt: ProseFormat
    markers: tuple[re.Pattern[str], ...]
    rcpt: tuple[tuple[re.Pattern[str], bool], ...]  # (pattern, names an address: try only on lines with "@")
    begin: re.Pattern[str] | None
    end: tuple[re.Pattern[str], ...]
    delayed: re.Pattern[str] | None
    skip: re.Pattern[str] | None


#: What ``ADDR`` in a family's pattern stands for: a mail address as bounces write it.
ADDR = r"[^\s<>()\[\]\"',;:@]++@[^\s<>()\[\]\"',;:@]++"


def compile_formats(formats: tuple[ProseFormat, ...]) -> tuple[_Compiled, ...]:
    """The rows with their patterns compiled (``ADDR`` expanded)."""

    def c(p: str) -> re.Pattern[str]:
        return re.compile(p.replace("ADDR", ADDR), _FLAGS)

    return tuple(
        _Compiled(
            f,
            tuple(c(p) for p in f.markers),
            tuple((c(p), "ADDR" in p) for p in f.rcpt),
            c(f.begin) if f.begin else None,
            tuple(c(p) for p in (*f.end, *COMMON_END)),
            c(f.delayed) if f.delayed else None,
            c(f.skip) if f.skip else None,
        )
        for f in formats
    )


_TAG_BREAK = re.compile(r"<\s*(?:br|/p|/div|/tr|/li|/h\d|/table|p|div|tr)\b[^>]*>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")
_INVISIBLE = re.compile(r"<(style|script|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)


def html_to_text(markup: str) -> str:
    """Plain lines of an HTML part (block ends become line ends; tags dropped; entities decoded)."""
    markup = _INVISIBLE.sub(" ", markup)
    markup = _TAG_BREAK.sub("\n", markup.replace("\r", " ").replace("\n", " "))
    return html.unescape(_TAG.sub("", markup)).replace("\xa0", " ")


def unquote(text: str) -> str:
    """A forwarded bounce quoted with '>' loses one level of quoting; other text is returned as is."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines or sum(ln.startswith(">") for ln in lines) * 2 < len(lines):
        return text
    return "\n".join(ln[2:] if ln.startswith("> ") else ln[1:] if ln.startswith(">") else ln for ln in text.split("\n"))


def _clean_address(raw: str) -> str | None:
    value = raw.strip().strip("<>\"'.,;:[]() ").strip()
    if value.lower().startswith("mailto:"):
        value = value[7:]
    if is_address(value):
        return value.lower()
    m = ADDRESS.search(value)
    if m is not None and len(m.group(0)) >= len(value) - 2:
        return m.group(0).lower()
    return None


def _extract(cf: _Compiled, lines: list[str]) -> tuple[list[Found], int]:
    """The recipients of one family's report, and the index of the line where the report ends."""
    start = 0
    if cf.begin is not None:
        for i, line in enumerate(lines):
            if cf.begin.search(line):
                start = i
                break
        else:
            return [], len(lines)
    found: list[Found] = []
    current: Found | None = None
    pending: list[str] = []
    after_rcpt = False
    stop = len(lines)
    for i in range(start, len(lines)):
        line = lines[i]
        if any(p.search(line) for p in cf.end):
            stop = i
            break
        m = None
        for pat, needs_at in cf.rcpt:
            if needs_at and "@" not in line:
                continue
            m = pat.search(line)
            if m is not None:
                break
        if m is not None:
            raw = m.group("a")
            addr = _clean_address(raw)
            if addr is None and ("@" in raw or not raw.strip()):
                m = None  # looked like a recipient line but holds no usable address
        if m is None:
            if not line.strip():
                continue
            if cf.fmt.reason_first:
                if after_rcpt:
                    pending, after_rcpt = [], False
                pending.append(line.strip())
            elif current is not None:
                current.diag.append(line.strip())
            continue
        groups = m.groupdict()
        same_line = (groups.get("d") or "").strip()
        current = Found(addr, m.group("a").strip())
        if cf.fmt.reason_first:
            current.diag.extend(pending)
            after_rcpt = True
        if same_line:
            current.diag.append(same_line)
        found.append(current)
    if cf.fmt.reason_first and pending and found:
        for f in found:
            if not f.diag:
                f.diag.extend(pending)
    return _merge(found), stop


def _merge(found: list[Found]) -> list[Found]:
    """One entry per address, in first-seen order; the reasons of repeated mentions are joined."""
    out: list[Found] = []
    index: dict[str, Found] = {}
    for f in found:
        key = f.address or f.hint
        old = index.get(key)
        if old is None:
            index[key] = f
            out.append(f)
            continue
        for line in f.diag:
            if line not in old.diag:
                old.diag.append(line)
    return out


#: A report's recipients are near its start, and no recipient line is long: bounds on the work per message.
MAX_TEXT = 256 * 1024
MAX_LINE = 1000


def read_prose(text: str, formats: tuple[_Compiled, ...]) -> tuple[str, bool, list[Found]] | None:
    """(family, delayed, recipients) of the first family that finds any; None when none does."""
    lines = [ln[:MAX_LINE] for ln in text[:MAX_TEXT].replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    text = "\n".join(lines)
    for cf in formats:
        if not any(p.search(text) for p in cf.markers):
            continue
        if cf.skip is not None and cf.skip.search(text):
            return cf.fmt.name, False, []
        found, stop = _extract(cf, lines)
        if found:
            delayed = cf.delayed is not None and cf.delayed.search("\n".join(lines[:stop])) is not None
            return cf.fmt.name, delayed, found
    return None


def to_records(
    family: str, delayed: bool, found: list[Found], addresses: list[str | None],
    originals: list[str | None] | None = None,
) -> list[DSNRecipient]:
    """Records of *found* with the addresses resolved by the caller (None: dropped), and the
    addresses they were forwarded from where the report says (*originals*)."""
    out: list[DSNRecipient] = []
    seen: set[str] = set()
    for f, addr, original in zip(found, addresses, originals or [None] * len(found)):
        if addr is None or addr in seen:
            continue
        seen.add(addr)
        out.append(
            make_recipient(
                addr,
                action="delayed" if delayed else "failed",
                status=None,
                diagnostic=" ".join(f.diag),
                standard=False,
                source=family,
                original_recipient=original if original != addr else None,
            )
        )
    return out
