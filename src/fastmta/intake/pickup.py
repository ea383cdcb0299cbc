"""Pickup files: an RFC 5322 message whose envelope rides in X-Sender/X-Receiver headers.

PowerMTA's pickup convention, and the format ``fastmta sink --capture``
writes, so a capture can be sent again. The envelope headers are removed
before sending; everything else is sent byte for byte. Malformed input is an
:class:`~fastmta.errors.InputError` naming the file and line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fastmta.errors import InputError
from fastmta.message.headers import header_section_error
from fastmta.queue.records import split_address

#: Refuse absurd files before reading them whole.
MAX_PICKUP_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PickupMessage:
    path: Path
    sender: str  # "" is the null sender (<>)
    recipients: list[str]
    content: bytes  # the message without the envelope headers


def _address(value: bytes, path: Path, line: int, what: str) -> str:
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InputError(f"{what} is not valid UTF-8", source=str(path), line=line) from None
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if what == "X-Sender" and text == "":
        return ""
    try:
        split_address(text, what)
    except InputError as exc:
        raise InputError(exc.reason, source=str(path), line=line) from None
    return text


def parse_pickup(data: bytes, path: Path) -> PickupMessage:
    """Split *data* into envelope and content; see the module docs."""
    if b"\x00" in data:
        raise InputError("contains NUL bytes", source=str(path))
    unsafe = header_section_error(data)
    if unsafe is not None:
        raise InputError(unsafe, source=str(path))
    sender: str | None = None
    recipients: list[str] = []
    kept: list[bytes] = []
    pos = 0
    line_no = 0
    skipping = False  # inside a folded X-Sender/X-Receiver header
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
            if not skipping:
                kept.append(raw)
            pos = end
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or b" " in name.strip() or name != name.strip():
            if line_no == 1:
                raise InputError("not an RFC 5322 message: no header on the first line", source=str(path), line=1)
            raise InputError(f"malformed header line {line[:60]!r}", source=str(path), line=line_no)
        lname = name.lower()
        if lname == b"x-sender":
            if sender is not None:
                raise InputError("more than one X-Sender header", source=str(path), line=line_no)
            sender = _address(value, path, line_no, "X-Sender")
            skipping = True
        elif lname == b"x-receiver":
            for part in value.split(b","):
                if part.strip():
                    recipients.append(_address(part, path, line_no, "X-Receiver"))
            skipping = True
        else:
            skipping = False
            kept.append(raw)
        pos = end
    if sender is None:
        raise InputError("no X-Sender header (pickup files carry their envelope)", source=str(path))
    if not recipients:
        raise InputError("no X-Receiver header (pickup files carry their envelope)", source=str(path))
    if not kept:
        raise InputError("the message has no headers besides the envelope", source=str(path))
    content = b"".join(kept) + (data[body_start:] if body_start is not None else b"")
    return PickupMessage(path, sender, recipients, content)


def read_pickup_bytes(path: Path) -> bytes:
    """The file's bytes, or InputError (too big, unreadable) naming it."""
    # One open, fstat and read on the descriptor (not stat + Path.read_bytes):
    # a run reads tens of thousands of these on the event loop, and the size
    # checked is the size of the file actually read.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size > MAX_PICKUP_BYTES:
                raise InputError(f"file is {size} bytes, over the {MAX_PICKUP_BYTES} byte limit", source=str(path))
            data = os.read(fd, size + 1)  # a short read of a regular file is its end
            if len(data) > size:  # it grew since the fstat: read on, as far as the limit
                chunks = [data]
                total = len(data)
                while total <= MAX_PICKUP_BYTES and (chunk := os.read(fd, 1 << 20)):
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
