"""Pickup files: an RFC 5322 message whose envelope rides in X-Sender/X-Receiver headers.

PowerMTA's pickup convention, and the format ``fastmta sink --capture``
writes, so a capture can be sent again. The envelope headers are removed
before sending; everything else is sent byte for byte. Malformed input is an
:class:`~fastmta.errors.InputError` naming the file and line.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from fastmta.errors import InputError
from fastmta.message.core import find_header_fields
from fastmta.message.headers import header_section_error, without_mbox_start
from fastmta.queue.records import once_each, split_address

#: Refuse absurd files before reading them whole.
MAX_PICKUP_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PickupMessage:
    path: Path | str  # as the reader names it
    sender: str  # "" is the null sender (<>)
    recipients: list[str]
    content: bytes  # the message without the envelope headers


def _address(value: bytes, path: Path | str, line: int, what: str) -> str:
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InputError(f"{what} is not valid UTF-8", source=str(path), line=line) from None
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if what == "X-Sender" and text == "":
        return ""
    try:
        return split_address(text, what)[0]
    except InputError as exc:
        raise InputError(exc.reason, source=str(path), line=line) from None


class _Envelope:
    """The X-Sender / X-Receiver values met so far, checked as they come."""

    __slots__ = ("path", "recipients", "sender")

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self.sender: str | None = None
        self.recipients: list[str] = []

    def add(self, lname: bytes, value: bytes, line: int) -> None:
        """*value*: the header's whole value, unfolded (a folded X-Receiver list loses no address)."""
        if lname == b"x-sender":
            if self.sender is not None:
                raise InputError("more than one X-Sender header", source=str(self.path), line=line)
            self.sender = _address(value, self.path, line, "X-Sender")
        else:
            for part in value.split(b","):
                if part.strip():
                    self.recipients.append(_address(part, self.path, line, "X-Receiver"))

    def message(self, content: bytes, headers: bool, data: bytes) -> PickupMessage:
        """The message: *content* (of the file's *data*) without the envelope; *headers*: it has a header
        besides the envelope."""
        if self.sender is None:
            raise InputError("no X-Sender header (pickup files carry their envelope)", source=str(self.path))
        if not self.recipients:
            raise InputError("no X-Receiver header (pickup files carry their envelope)", source=str(self.path))
        if not headers:
            raise InputError("the message has no headers besides the envelope", source=str(self.path))
        if len(content) > MAX_LINE and max(map(len, content.split(b"\n"))) > MAX_LINE:  # ~1 µs a 2 KB file
            _refuse_long_lines(content, data, self.path)
        # Each recipient once (X-Receiver given twice): one copy, one record, as the engine keeps them.
        return PickupMessage(self.path, self.sender, list(once_each(self.recipients)), content)


_ENVELOPE_FIELDS = (b"x-sender", b"x-receiver")

#: RFC 5322 2.1.1: a line is at most 998 characters before its CRLF.
MAX_LINE = 998


def _refuse_long_lines(content: bytes, data: bytes, path: Path | str) -> None:
    """Refuse a message with a line over :data:`MAX_LINE` (a CR before the LF does not count).

    Strict receivers (Exim, OpenSMTPD, many appliances) answer "500 Line too
    long" at the end of DATA: a bounce of every recipient, after the file was
    taken. Postfix breaks such lines as it sends, which would also break a DKIM
    signature the file already carries; refused here instead, naming the line,
    like any other malformed file. (A campaign's parts are encoded by us,
    quoted-printable or base64, and never have such lines.)
    """
    for raw in content.split(b"\n"):
        n = len(raw) - raw.endswith(b"\r")
        if n > MAX_LINE:
            at = data.find(raw)
            raise InputError(
                f"a line of {n} characters: RFC 5322 allows {MAX_LINE} (receivers refuse it with "
                "'500 Line too long'); wrap it, or encode the part quoted-printable or base64",
                source=str(path), line=data.count(b"\n", 0, at) + 1 if at >= 0 else None)


def parse_pickup(data: bytes, path: Path | str) -> PickupMessage:
    """Split *data* into envelope and content; see the module docs."""
    if b"\x00" in data:
        raise InputError("contains NUL bytes", source=str(path))
    data = without_mbox_start(data)
    unsafe = header_section_error(data)
    if unsafe is not None:
        first = unsafe.startswith(("not an RFC 5322 message", "the first line"))  # about line 1
        raise InputError(unsafe, source=str(path), line=1 if first else None)
    # Nearly every pickup file has a header section of plain lines: the
    # compiled core finds its envelope fields in one pass (~0.3 µs instead of
    # ~12 for a Python loop over the lines). Anything else takes the line
    # parser, which names the fault; the two agree on every input the fast one
    # takes (tests/test_pickup_parse.py checks them against each other).
    found = find_header_fields(data, _ENVELOPE_FIELDS)
    if found is None:
        return _parse_lines(data, path)
    head_end, spans = found
    envelope = _Envelope(path)
    kept: list[bytes] = []
    pos = 0
    line = 1  # of the field at *pos*: counted on from the last field, never from the top (100,000 X-Receivers)
    for i in range(0, len(spans), 2):
        start, end = spans[i], spans[i + 1]
        kept.append(data[pos:start])
        line += data.count(b"\n", pos, start)
        name, _, value = data[start:end].replace(b"\r\n", b"").replace(b"\n", b"").partition(b":")
        envelope.add(name.lower(), value, line)
        line += data.count(b"\n", start, end)
        pos = end
    headers = any(kept) or bool(data[pos:head_end].strip(b"\r\n"))  # a field besides the envelope's
    kept.append(data[pos:])
    return envelope.message(b"".join(kept), headers, data)


def _parse_lines(data: bytes, path: Path | str) -> PickupMessage:
    """The line-by-line parser: any header section, with the fault's line when it is malformed."""
    envelope = _Envelope(path)
    kept: list[bytes] = []
    pos = 0
    line_no = 0
    field: tuple[bytes, bytes, int] | None = None  # an envelope header being read (it may be folded)
    body_start: int | None = None
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        raw = data[pos:end]
        line = raw.rstrip(b"\r\n")
        line_no += 1
        if line == b"":
            body_start = pos
            break
        if line[:1] in (b" ", b"\t"):
            if line_no == 1:
                raise InputError("message starts with a continuation line", source=str(path), line=line_no)
            if field is None:
                kept.append(raw)
            else:
                field = (field[0], field[1] + line, field[2])
            pos = end
            continue
        if field is not None:
            envelope.add(*field)
            field = None
        name, colon, value = line.partition(b":")
        if not colon or not name or b" " in name.strip() or name != name.strip():
            if line_no == 1:
                raise InputError("not an RFC 5322 message: no header on the first line", source=str(path), line=1)
            raise InputError(f"malformed header line {line[:60]!r}", source=str(path), line=line_no)
        lname = name.lower()
        if lname in (b"x-sender", b"x-receiver"):
            field = (lname, value, line_no)
        else:
            kept.append(raw)
        pos = end
    if field is not None:
        envelope.add(*field)
    content = b"".join(kept) + (data[body_start:] if body_start is not None else b"")
    return envelope.message(content, bool(kept), data)


#: The first read of a pickup file: a whole one, nearly always (no fstat needed).
_FIRST_READ = 64 * 1024


def read_pickup_bytes(path: Path | str) -> bytes:
    """The file's bytes, or InputError (too big, unreadable) naming it."""
    # One open and one read on the descriptor for a file under 64 KiB (a short
    # read of a regular file is its end): a run reads tens of thousands of
    # these on the event loop. A bigger file is measured (fstat) and refused
    # before it is read whole when it is over the limit.
    try:
        # O_NONBLOCK: a FIFO named *.eml must not block the reader for ever on open (it changes
        # nothing for a regular file); with no writer it reads as empty, and is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            data = os.read(fd, _FIRST_READ)
            if not data and not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InputError("cannot read: not a regular file", source=str(path))
            if len(data) == _FIRST_READ:
                size = os.fstat(fd).st_size
                if size > MAX_PICKUP_BYTES:
                    raise InputError(f"file is {size} bytes, over the {MAX_PICKUP_BYTES} byte limit", source=str(path))
                chunks = [data]
                total = len(data)
                # Read on to the end (it may have grown since the fstat), as far as the limit.
                while total <= MAX_PICKUP_BYTES and (chunk := os.read(fd, max(size + 1 - total, 1 << 20))):
                    chunks.append(chunk)
                    total += len(chunk)
                data = b"".join(chunks)
        finally:
            os.close(fd)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", source=str(path)) from None
    if len(data) > MAX_PICKUP_BYTES:
        raise InputError(f"file grew over the {MAX_PICKUP_BYTES} byte limit while read", source=str(path))
    return data


def read_pickup(path: Path) -> PickupMessage:
    return parse_pickup(read_pickup_bytes(path), path)
