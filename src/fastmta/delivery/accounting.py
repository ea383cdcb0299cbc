"""The accounting log: one line per recipient outcome, written in batches.

Two formats share one writer:

* JSON Lines (the default): ``Outcome.as_record()`` encoded with msgspec. Its
  field names are a public interface (tests and users parse them); they come
  from ``message.py`` and are not touched here.
* CSV with PowerMTA-like columns (chosen by a ``.csv`` file name or
  ``format="csv"``), so that tools written for PowerMTA accounting files can
  read ours. Column names follow PowerMTA's spelling and meaning where
  fastmta has the same fact; the columns after ``jobId`` are fastmta's own
  and keep what the JSON record has, so nothing is lost by choosing CSV.

Lines are encoded as they come and kept in memory; they reach the file when
the batch is full, on :meth:`AccountingLog.flush` (the engine flushes a few
times a second, and after every line when a spool journal must not get ahead
of the accounting) and on close. A crash can lose at most the unflushed batch
of log lines, never a message: the durable record is the spool journal's job.

Rotation (``max_bytes`` / ``max_age``) renames the current file with a UTC
timestamp before its extension (``acct.csv`` -> ``acct-20240102T030405.123Z.csv``)
and starts a new one. It only ever happens between whole lines, and a CSV
file always starts with its header, so every file can be read on its own.
The log assumes it is the only writer of its file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, Self

import msgspec

from fastmta.queue.records import Outcome, Status
from fastmta.smtp.dsn_params import DSN_META, dsn_fields
from fastmta.terminal_chars import BEYOND_C0

Format = Literal["jsonl", "csv"]


def jsonl_line(outcome: Outcome, encoder: msgspec.json.Encoder) -> bytes:
    """The JSON line of *outcome*: byte for byte ``encoder.encode(outcome.as_record()) + b"\\n"``, without
    the dict (the record's fields encoded from a struct, only the meta keys as a dict)."""
    line = encoder.encode(outcome.record_fields())
    extra = outcome.meta_extra()
    if extra:
        line = line[:-1] + b"," + encoder.encode(extra)[1:]
    if not line.isascii() or b"\x7f" in line:  # the usual line is plain ASCII: one test, not a regex (1 µs)
        line = _JSON_UNSAFE.sub(_json_escape, line.decode("utf-8")).encode("utf-8")
    return line + b"\n"


# What JSON may carry raw but a terminal acts on (``less`` or ``cat`` of the log; fastmta.terminal_chars):
# a server's reply holds what its writer wants. Written as \u escapes: the same string to any JSON reader.
_JSON_UNSAFE = re.compile(f"[{BEYOND_C0}]")


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"

#: The CSV columns, in order. Up to ``jobId`` they are PowerMTA accounting
#: fields (same name, same meaning); after it, fastmta's own, in camelCase to
#: match. ``meta`` holds the message's meta keys that have no column of their
#: own, as a JSON object, so a CSV file keeps everything the JSONL one does.
CSV_COLUMNS: tuple[str, ...] = (
    "type",  # d delivered, b bounced or expired (as PowerMTA logs expiry), t transient (deferred)
    "timeLogged",
    "timeQueued",
    "totalSecondsQueued",
    "orig",  # envelope sender: only known when meta has "sender" (see _orig)
    "rcpt",
    "dsnAction",  # RFC 3464 action: relayed / failed / delayed
    "dsnStatus",  # RFC 3463 enhanced status code
    "dsnDiag",  # "smtp;" + the reply as the server sent it
    "dsnMta",  # "mx.host (1.2.3.4)"
    "bounceCat",  # PowerMTA's bounce category vocabulary (b and t records)
    "dlvSourceIp",
    "dlvDestinationIp",
    "dlvSize",  # message size in bytes, when meta has "size"
    "jobId",  # meta "job"
    # fastmta's own columns
    "status",  # delivered / bounced / expired / deferred / lost / deleted (tells b-bounced from b-expired)
    "messageId",
    "attempts",
    "dsnCode",  # the SMTP reply code
    "category",  # fastmta's classify.Category of the reply
    "bounceType",  # hard / soft
    "site",
    "mxHost",
    "timeNextAttempt",  # deferred only
    "vmta",  # the egress source's name (PowerMTA's field: its virtual MTA)
    "dlvTlsProtocol",  # the session's TLS version, empty in clear (PowerMTA's field)
    "dlvTlsCipher",
    "meta",
)

#: PowerMTA record type letters. PowerMTA has no record type of its own for
#: expiry: a message that outlives its queue lifetime is logged as a "b"
#: record with bounce category "message-expired", and so is ours.
RECORD_TYPE: dict[Status, str] = {
    Status.DELIVERED: "d",
    Status.BOUNCED: "b",
    Status.EXPIRED: "b",
    Status.DEFERRED: "t",
    Status.LOST: "b",  # failed: never delivered, and it will not be
    Status.DELETED: "b",  # taken out of the queue by an operator, unsent
    Status.SUPPRESSED: "b",  # on the suppression list at intake: never sent
}

#: RFC 3464 actions. "relayed" rather than "delivered" for a 2xx: the next hop
#: took the message, and PowerMTA logs plain SMTP handoffs the same way.
DSN_ACTION: dict[Status, str] = {
    Status.DELIVERED: "relayed",
    Status.BOUNCED: "failed",
    Status.EXPIRED: "failed",
    Status.DEFERRED: "delayed",
    Status.LOST: "failed",
    Status.DELETED: "failed",
    Status.SUPPRESSED: "failed",
}

#: fastmta's reply categories (classify.Category values) in PowerMTA's bounce
#: category vocabulary, for tools that aggregate by bounceCat. Unlisted or
#: unknown categories become "other"; the exact one stays in ``category``.
BOUNCE_CATEGORY: dict[str, str] = {
    "invalid_recipient": "bad-mailbox",
    "invalid_domain": "bad-domain",
    "inactive_mailbox": "inactive-mailbox",
    "mailbox_full": "quota-issues",
    "message_too_large": "content-related",
    "spam_or_virus": "spam-related",
    "content_filtered": "content-related",
    "message_format": "content-related",
    "policy": "policy-related",
    "reputation_block": "policy-related",
    "auth_failure": "policy-related",
    "rate_limited": "policy-related",
    "greylisted": "policy-related",
    "relay_denied": "relaying-issues",
    "sender_rejected": "invalid-sender",
    "remote_system": "other",
    "network": "bad-connection",
    "protocol_error": "protocol-errors",
    "expired": "message-expired",
}

#: Meta keys that have a column of their own (and so are left out of ``meta``).
_META_COLUMNS = frozenset({"job", "size", "sender"})

# Every C0 control character and DEL becomes a space. CR and LF would end the
# physical line (a reader that splits on newlines, or a crash between the two
# halves, would then see half a record); NUL trips some CSV readers. Quoting
# alone would keep the csv module itself correct, but not `wc -l`, `tail`,
# `grep` or the torn-tail check below, so they are removed at the source.
# C0 controls and what else a terminal acts on (fastmta.terminal_chars); the table derived from the class.
_CONTROL = re.compile(f"[\x00-\x1f{BEYOND_C0}]")
_CONTROL_TO_SPACE = {c: " " for c in range(0x2070) if _CONTROL.match(chr(c))}

# Cells a spreadsheet would evaluate as a formula start with one of these.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _clean(text: str) -> str:
    return text.translate(_CONTROL_TO_SPACE)


def detect_format(path: str | Path) -> Format:
    """The format a file name asks for: CSV for ``.csv`` (any case), else JSON Lines."""
    return "csv" if Path(path).suffix.lower() == ".csv" else "jsonl"


def format_time(t: float, iso: bool = True) -> str:
    """A wall-clock time for the CSV: ISO 8601 in UTC with milliseconds, or Unix seconds."""
    if iso:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
    return f"{t:.3f}"


def csv_row(outcome: Outcome, *, iso_times: bool = True) -> list[str]:
    """The CSV cells (in :data:`CSV_COLUMNS` order) for one outcome, CR/LF removed.

    Exposed so that other tools (e.g. a converter from JSONL) produce exactly
    what the log writes.
    """
    reply = outcome.reply
    meta = outcome.meta or {}
    status = outcome.status
    if status is Status.EXPIRED:
        bounce_cat = "message-expired"
    elif status is Status.DELIVERED:
        bounce_cat = ""
    else:
        bounce_cat = BOUNCE_CATEGORY.get(outcome.category or "", "other")
    # The enhanced code when the server sent one, else the class the reply
    # code implies (RFC 3463 X.0.0), as PowerMTA does: a DSN needs a status.
    dsn_status = reply.enhanced or f"{reply.code // 100}.0.0"
    diag = f"smtp;{reply.code} {' '.join(reply.lines)}".rstrip()
    if outcome.mx_host and outcome.mx_ip:
        dsn_mta = f"{outcome.mx_host} ({outcome.mx_ip})"
    else:
        dsn_mta = outcome.mx_host or outcome.mx_ip or ""
    rest = {k: v for k, v in meta.items() if k not in _META_COLUMNS}
    if DSN_META in rest:
        rest.update(dsn_fields(rest.pop(DSN_META), outcome.recipient))
    cells = [
        RECORD_TYPE[status],
        format_time(outcome.time, iso_times),
        format_time(outcome.queued_at, iso_times),
        f"{max(outcome.time - outcome.queued_at, 0.0):.3f}",
        _text(outcome.sender if outcome.sender is not None else meta.get("sender")),
        outcome.recipient,
        DSN_ACTION[status],
        dsn_status,
        diag,
        dsn_mta,
        bounce_cat,
        outcome.source_ip or "",
        outcome.mx_ip or "",
        _text(outcome.size if outcome.size is not None else meta.get("size")),
        _text(meta.get("job")),
        status.value,
        outcome.message_id,
        str(outcome.attempts),
        str(reply.code),
        outcome.category or "",
        outcome.bounce or "",
        outcome.site or "",
        outcome.mx_host or "",
        format_time(outcome.next_attempt, iso_times) if outcome.next_attempt is not None else "",
        outcome.source or "",
        outcome.tls_version or "",
        outcome.tls_cipher or "",
        msgspec.json.encode(rest).decode() if rest else "",
    ]
    # One scan of the whole row (the usual case: nothing to clean) is several
    # times cheaper than translating each of its cells.
    if _CONTROL.search("".join(cells)) is None:
        return cells
    return [_clean(c) for c in cells]


def _text(value: Any) -> str:
    """A meta value as a cell: empty for None, JSON for non-strings (a dict, a list, a number)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()


def _guard_formula(cell: str) -> str:
    # OWASP's advice for CSV opened in spreadsheets: a leading quote makes the
    # cell text. Off by default: it changes the data (a "-" or "+" can start a
    # real value) and PowerMTA-style consumers are scripts, not spreadsheets.
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


class AccountingLog:
    """Batched, optionally rotating accounting log in JSON Lines or CSV.

    ``path``: the current file (appended to if it exists). ``format``: "jsonl"
    or "csv"; by default from the extension. ``batch_lines``: lines kept in
    memory before a write. ``max_bytes``: rotate before a file would grow past
    this (a single longer line still gets a file of its own; it is never
    split). ``max_age``: rotate once the current file has been written to for
    this many seconds (counted from when this log opened or started it).
    ``clock``: wall clock for ``max_age`` and rotated names (tests inject one).
    ``iso_times``: CSV times as ISO 8601 UTC (default) or Unix seconds.
    ``guard_formulas``: prefix CSV cells that a spreadsheet would run as a
    formula with ``'``.
    """

    def __init__(
        self,
        path: str | Path,
        batch_lines: int = 512,
        *,
        format: Format | None = None,
        max_bytes: int | None = None,
        max_age: float | None = None,
        clock: Callable[[], float] = time.time,
        iso_times: bool = True,
        guard_formulas: bool = False,
    ) -> None:
        if format not in (None, "jsonl", "csv"):
            raise ValueError(f"accounting format must be 'jsonl' or 'csv', not {format!r}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if max_age is not None and max_age <= 0:
            raise ValueError("max_age must be positive")
        self.path = Path(path)
        self.format: Format = format or detect_format(self.path)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.rotated: list[Path] = []  # files this log renamed, oldest first
        self.lines = 0  # lines accepted by write() (flushed or not)
        self.unwritten = 0  # lines a failed write may have lost (the disk was full)
        self._clock = clock
        self._iso = iso_times
        self._guard = guard_formulas
        self._batch = batch_lines
        self._pending: list[bytes] = []
        self._encoder = msgspec.json.Encoder()
        # One csv.writer over a reusable buffer: each row is encoded on its own
        # so that rotation by size can cut between rows, never inside one.
        self._row_buf = io.StringIO()
        # CRLF: RFC 4180, as PowerMTA writes. Rows hold no CR or LF of their
        # own (see _clean), so every physical line is exactly one record.
        self._csv = csv.writer(self._row_buf, lineterminator="\r\n")
        self._header = self._encode_row(list(CSV_COLUMNS)) if self.format == "csv" else b""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = self._open_existing()
        self._closed = False

    # --- public API ---------------------------------------------------------------

    def write(self, outcome: Outcome) -> None:
        """Queue one outcome's line; written on the next flush (or now, when the batch is full)."""
        if self.format == "csv":
            cells = csv_row(outcome, iso_times=self._iso)
            if self._guard:
                cells = [_guard_formula(c) for c in cells]
            line = self._encode_row(cells)
        else:
            line = jsonl_line(outcome, self._encoder)
        self._pending.append(line)
        self.lines += 1
        if len(self._pending) >= self._batch:
            self.flush()

    def write_record(self, record: dict[str, Any]) -> None:
        """Queue a record that is not a delivery attempt (what came back: oob_bounce, complaint, unsubscribe...).

        JSONL: the record as it is (a ``status`` naming its kind, ``time``,
        ``recipient``...). CSV: PowerMTA's feedback-loop record type ``f``
        for complaints, ``rb`` for remote bounces, else the kind itself,
        with the columns that apply and the rest in ``meta``.
        """
        if self.format == "csv":
            kind = str(record.get("status", ""))
            known = {"status", "time", "recipient", "sender", "diagnostic", "category", "bounce_type", "campaign",
                     "message_id"}
            cells = dict.fromkeys(CSV_COLUMNS, "")
            cells.update({
                "type": {"complaint": "f", "oob_bounce": "rb"}.get(kind, kind), "status": kind,
                "timeLogged": format_time(float(record.get("time", self._clock())), self._iso),
                "rcpt": _text(record.get("recipient")), "orig": _text(record.get("sender")),
                "dsnDiag": _text(record.get("diagnostic")), "category": _text(record.get("category")),
                "bounceType": _text(record.get("bounce_type")), "jobId": _text(record.get("campaign")),
                "messageId": _text(record.get("message_id")),
                "meta": json.dumps({k: v for k, v in record.items() if k not in known}, sort_keys=True),
            })
            values = list(cells.values())
            if self._guard:
                values = [_guard_formula(c) for c in values]
            line = self._encode_row(values)
        else:
            line = self._encoder.encode(record) + b"\n"
        self._pending.append(line)
        self.lines += 1
        if len(self._pending) >= self._batch:
            self.flush()

    def flush(self) -> None:
        """Write the batch to the OS, rotating first and between lines as needed."""
        if self._closed:
            return
        # Rotation by age is checked here too with nothing pending: the engine
        # flushes a few times a second, so an idle log still closes its file on
        # time. A file holding no record is never rotated (it would only make
        # an empty file).
        if self.max_age is not None and self._has_records() and self._clock() - self._started >= self.max_age:
            self._rotate()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        try:
            if self.max_bytes is None:
                self._write(pending)
            else:
                self._write_sized(pending, self.max_bytes)
            self._file.flush()
        except OSError as exc:
            self.unwritten += len(pending)  # at most these (some may be on disk, the last one torn)
            raise OSError(exc.errno, f"accounting log {self.path}: {exc.strerror or exc}; up to "
                          f"{self.unwritten:,} line(s) not written") from exc

    def close(self) -> None:
        """Flush and close; an OSError (a full disk) names the file, and the log is closed all the same."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            try:
                self._file.close()
            except OSError as exc:  # the buffer's last write
                raise OSError(exc.errno, f"accounting log {self.path}: {exc.strerror or exc}") from exc

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------

    def _encode_row(self, cells: Iterable[str]) -> bytes:
        self._csv.writerow(cells)
        text = self._row_buf.getvalue()
        self._row_buf.seek(0)
        self._row_buf.truncate()
        # Always valid UTF-8: a lone surrogate (from a file name decoded with
        # surrogateescape, say) is written visibly rather than failing the batch.
        return text.encode("utf-8", "backslashreplace")

    def _write(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        self._file.write(data)
        self._size += len(data)

    def _write_sized(self, pending: list[bytes], limit: int) -> None:
        start = 0
        chunk = 0
        for i, line in enumerate(pending):
            if self._size + chunk + len(line) > limit and (chunk or self._has_records()):
                # This line would overflow: write what fits, start a new file.
                self._write(pending[start:i])
                self._rotate()
                start, chunk = i, 0
            chunk += len(line)
        self._write(pending[start:])

    def _has_records(self) -> bool:
        return self._size > len(self._header)

    def _open_existing(self) -> IO[bytes]:
        """Open the file for appending, making sure new lines start clean.

        An existing file whose last line was cut short (a crash mid-write)
        must not have the next line glued to it. JSONL: the fragment is
        ended with a newline (one unparsable line, the rest intact). CSV: a
        fragment may stop inside a quoted cell, which would swallow the rows
        after it, and a file with another header (other columns) cannot take
        our rows; either file is rotated away whole instead.
        """
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size:
            with open(self.path, "rb") as f:
                head = f.read(len(self._header)) if self._header else b""
                f.seek(size - 1)
                torn = f.read(1) != b"\n"
            if self.format == "csv" and (torn or head != self._header):
                self._rename_current()
                size = 0
            elif torn:
                with open(self.path, "ab") as f:
                    f.write(b"\n")
                size += 1
        file = self._start_file() if size == 0 else _open_private(self.path)
        if size:
            self._size = size
            self._started = self._clock()
        return file

    def _start_file(self) -> IO[bytes]:
        file = _open_private(self.path)
        file.write(self._header)
        file.flush()
        self._size = len(self._header)
        self._started = self._clock()
        return file

    def _rotate(self) -> None:
        self._file.flush()
        self._file.close()
        self._rename_current()
        self._file = self._start_file()

    def _rename_current(self) -> None:
        stamp = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"
        suffix = self.path.suffix
        base = self.path.with_suffix("").name if suffix else self.path.name
        target = self.path.with_name(f"{base}-{stamp}{suffix}")
        n = 0
        # Two rotations in one millisecond (or with a frozen test clock): never
        # overwrite, add a counter. "_" sorts after "." and the counter is
        # zero-padded, so names still sort in rotation order.
        while target.exists():
            n += 1
            target = self.path.with_name(f"{base}-{stamp}_{n:04d}{suffix}")
        os.replace(self.path, target)
        self.rotated.append(target)


def _open_private(path: Path) -> IO[bytes]:
    """Open *path* for appending, never world-readable (at most 0660: what was sent to whom is private)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o660), "ab")  # closed by the log
