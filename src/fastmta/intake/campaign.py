"""Campaign jobs: a TOML file naming a template, a sender, DKIM keys and a recipients file.

Example (paths are relative to the job file)::

    [campaign]
    id = "welcome-2026-11"                  # job id, copied to accounting
    sender = "bounces@news.example.com"     # envelope sender (MAIL FROM)
    recipients = "recipients.csv"           # .csv (header row) or .jsonl (one object per line)
    address_field = "email"                 # the column holding the address (default "email")

    [[dkim]]                                # zero, one or several signatures
    domain = "news.example.com"
    selector = "ed2026"
    key_path = "dkim-ed25519.pem"
    algorithm = "ed25519-sha256"

    [template]                              # see fastmta.message.mime for the template table
    text_file = "welcome.txt"
    [template.headers]
    From = "News <news@example.com>"
    To = "{{ email }}"
    Subject = "Hello {{ first_name | default(\\"friend\\") }}"

Sunset policy (optional): with ``sunset_days = N`` under ``[campaign]``, a
recipient whose engagement field (``engagement_field``, default
``last_engaged``: an ISO date or date-time from the sender's own tracking)
is more than N days old is not sent: it gets an accounting record with
status ``sunset`` instead (a :class:`~fastmta.intake.items.Sunset` item). With
``sunset_every = k`` as well, such a recipient is sent one campaign in k
instead of never: which ones is a hash of campaign id and address, so it is
the same on every run of a campaign and differs between campaigns. A row
without the field (or with it empty) is sent: nothing says it is inactive.

Everything about the job itself (unknown keys, unreadable files, bad keys)
is checked when it is loaded, before any mail goes out, and reported as one
:class:`~fastmta.errors.InputError` naming the file. Problems of single
recipient rows (a broken address, CR/LF/NUL in any field, a field the
template needs and the row lacks) reject that row only, with its line.

The recipients file is streamed: a million rows never sit in memory at once.
"""

from __future__ import annotations

import csv
import datetime
import json
import re
from collections.abc import Callable, Container, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import msgspec

from fastmta.errors import ConfigError, InputError
from fastmta.intake.items import Reject, SpoolItem, Sunset, record_text
from fastmta.keyset import KeySet, row_key
from fastmta.message.dkim import DkimKeyConfig, DkimSigner, load_signing_key
from fastmta.message.mime import CompiledCampaign, compile_campaign, inside_job_dir
from fastmta.message.returnpath import ReturnPath
from fastmta.message.unsubscribe import Unsubscribe
from fastmta.queue.records import split_address

#: The sunset policy: (row, address) -> None (send) or (reason, last engaged; None when unreadable).
SunsetCheck = Callable[[dict[str, Any], str], "tuple[str, str | None] | None"]


class CampaignSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    sender: str
    recipients: str
    id: str | None = None
    address_field: str = "email"
    #: Send a recipient as often as it appears (each occurrence is its own row
    #: key); by default a repeat is reported and not sent.
    allow_duplicates: bool = False
    #: The row field with the recipient's last engagement (ISO date or date-time).
    engagement_field: str = "last_engaged"
    #: Leave out recipients whose last engagement is older than this many days (record "sunset")...
    sunset_days: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: ... or send them one campaign in this many instead of never.
    sunset_every: Annotated[int, msgspec.Meta(ge=2)] | None = None
    #: Seconds each message may stay queued (at most the queue's max_lifetime): an offer that ends tonight.
    max_lifetime: Annotated[float, msgspec.Meta(gt=0)] | None = None

    def __post_init__(self) -> None:
        if self.sunset_every is not None and self.sunset_days is None:
            raise ValueError("sunset_every needs sunset_days (who counts as inactive)")


class CampaignJob(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    campaign: CampaignSection
    template: dict[str, Any]
    dkim: list[DkimKeyConfig] = []


_FORBIDDEN = ("\r", "\n", "\x00")
_ONE_CLICK_SIGNED = ("list-unsubscribe", "list-unsubscribe-post")

_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes kept by surrogateescape

# The csv module refuses fields over 128 KiB by default; merge fields (an HTML
# snippet, say) can be larger, and a refusal would end the whole file's reading.
csv.field_size_limit(16 * 1024 * 1024)

#: Above this size a message's body hash costs more than a hop to a thread (``items(sign_later=True)``).
_SIGN_LATER_BYTES = 32 * 1024


class Campaign:
    """A loaded, validated campaign job, ready to stream its messages."""

    def __init__(self, path: Path, job: CampaignJob, compiled: CompiledCampaign, signer: DkimSigner | None) -> None:
        self.path = path
        self.job = job
        self.compiled = compiled
        self.signer = signer
        self.id = job.campaign.id or record_text(path.stem)  # on record: never a lone surrogate
        names = {name.lower() for name in job.template.get("headers", {})}
        self._has_feedback_id = "feedback-id" in names
        # A template with its own List-Unsubscribe keeps it (and gets no Post
        # header of ours: one-click would then be claimed for its URI).
        self._has_list_unsubscribe = "list-unsubscribe" in names
        self._has_list_unsubscribe_post = "list-unsubscribe-post" in names
        # Gmail's Feedback-ID: campaign : customer : mail type : sender (the last is the one it keys on).
        sender_domain = job.campaign.sender.rpartition("@")[2].lower()
        self._feedback_id = ":".join(_feedback_field(x) for x in (self.id, "fastmta", "bulk", sender_domain))
        self.recipients_path = (path.parent / job.campaign.recipients).resolve()
        #: The day the sunset policy counts from (None: today, when the rows are read).
        self.today: datetime.date | None = None

    @classmethod
    def load(cls, path: Path, *, confined: bool = False) -> Campaign:
        """Read and check the job at *path*.

        *confined*: its DKIM keys and recipients file must be beside the job or below
        it, as its templates always must (``fastmta serve``'s pickup directory: whoever
        may drop a job there must not sign with any key, or read any list, the
        service can read). ``fastmta send``'s operator may name a key anywhere.
        """
        source = str(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", source=source) from None
        try:
            job = msgspec.toml.decode(data, type=CampaignJob)
        except msgspec.ValidationError as exc:
            raise InputError(f"invalid campaign job: {_describe(exc)}", source=source) from None
        except msgspec.DecodeError as exc:
            raise InputError(f"invalid TOML: {exc}", source=source) from None
        try:
            if job.campaign.sender:
                split_address(job.campaign.sender, "campaign.sender")
        except InputError as exc:
            raise InputError(exc.reason, source=source) from None
        try:
            compiled = compile_campaign(job.template, base_dir=path.parent, source=source)
            keys = []
            for i, key in enumerate(job.dkim):
                key_path = Path(key.key_path)
                if confined:
                    key_path = inside_job_dir(path.parent, key.key_path, f"{source}: dkim[{i}].key_path")
                    key = msgspec.structs.replace(key, key_path=str(key_path))
                elif not key_path.is_absolute():
                    key = msgspec.structs.replace(key, key_path=str(path.parent / key_path))
                # RFC 8058 4: the one-click headers must be under the signature,
                # also with a job's own list of signed headers.
                missing = tuple(h for h in _ONE_CLICK_SIGNED if h not in {n.strip().lower() for n in key.headers})
                if missing:
                    key = msgspec.structs.replace(key, headers=(*key.headers, *missing))
                keys.append(load_signing_key(key, source=f"{source}: dkim[{i}]"))
        except ConfigError as exc:
            raise InputError(str(exc).removeprefix(f"{source}: "), source=source) from None
        except InputError as exc:  # a template syntax error: it names file and line
            raise InputError(exc.reason, source=exc.source or source, line=exc.line) from None
        if confined:
            try:
                inside_job_dir(path.parent, job.campaign.recipients, "campaign.recipients")
            except ConfigError as exc:
                raise InputError(str(exc), source=source) from None
        campaign = cls(path, job, compiled, DkimSigner(keys) if keys else None)
        if not campaign.recipients_path.is_file():
            raise InputError(f"recipients file {job.campaign.recipients!r} not found", source=source)
        if campaign.recipients_path.suffix.lower() not in (".csv", ".jsonl"):
            raise InputError("recipients file must be .csv or .jsonl", source=source)
        return campaign

    def rows(self) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
        """(line, row, error) for every recipient row, streamed."""
        path = self.recipients_path
        if path.suffix.lower() == ".csv":
            # surrogateescape: a byte that is not UTF-8 spoils only its own row
            # (rejected below), not the decoding of everything around it.
            # utf-8-sig: a byte order mark (Excel writes one) is not part of the
            # first column's name, or no row would have an 'email' field.
            with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
                yield from _csv_rows(f)
        else:
            with open(path, "rb") as f:
                for line_no, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        obj = json.loads(raw)
                    except (ValueError, UnicodeDecodeError) as exc:
                        yield line_no, None, f"invalid JSON: {exc}"
                        continue
                    if not isinstance(obj, dict):
                        yield line_no, None, "a recipient row must be a JSON object"
                        continue
                    yield line_no, obj, None

    def row_key(self, address: str, occurrence: int = 0) -> int:
        """What identifies a row whatever its line: the campaign and the recipient (and which repeat of it)."""
        parts = [self.id, address.lower()]
        if occurrence:
            parts.append(str(occurrence))
        return row_key(*parts)

    def items(
        self,
        key: str = "",
        start_line: int = 0,
        taken: Container[int] = frozenset(),
        return_path: ReturnPath | None = None,
        unsubscribe: Unsubscribe | None = None,
        sign_later: bool = False,
    ) -> Iterator[SpoolItem | Reject]:
        """One item per recipient row from *start_line* on (rows before it are skipped unrendered).

        Rows whose key is in *taken* (sent by an earlier run, wherever the row
        was then) are skipped; a recipient repeated in the file is reported,
        not sent twice, unless the job allows duplicates.

        With a *return_path*, each message's envelope sender is its signed,
        per-recipient return path and it carries the trace header (and a
        Feedback-ID if the template has none), both inside the DKIM signature.

        With an *unsubscribe*, each message gets RFC 8058 one-click
        ``List-Unsubscribe`` (a signed per-recipient URL, list tag = the
        campaign id) and ``List-Unsubscribe-Post`` headers, also signed,
        unless the template has its own List-Unsubscribe.

        *sign_later*: a message whose signing is costly (an RSA key, or a large
        body) comes unsigned with ``SpoolItem.sign`` for the consumer to run
        in a thread; cheap ones (Ed25519 on a few KB) are signed here, where
        that costs less than the hop to a thread and back.
        """
        source = str(self.recipients_path)
        field = self.job.campaign.address_field
        sender = self.job.campaign.sender
        duplicates_allowed = self.job.campaign.allow_duplicates
        meta: dict[str, Any] = {"job": self.id}
        if self.job.campaign.max_lifetime is not None:
            meta["max_lifetime"] = self.job.campaign.max_lifetime
        seen = KeySet()  # keys met in this reading (8 bytes a row, not a set of strings)
        check_taken = not isinstance(taken, (frozenset, KeySet)) or len(taken) > 0  # a first run: nothing taken
        if self._has_list_unsubscribe:
            unsubscribe = None
        sunset = self._sunset_check()
        for line, row, error in self.rows():
            if line < start_line and line != 0:
                continue
            if row is None:
                yield Reject(source, line, error or "unreadable row", key, line)
                continue
            bad = merge_field_error(row)
            if bad is not None:
                yield Reject(source, line, bad, key, line)
                continue
            address = row.get(field)
            if not isinstance(address, str) or not address:
                yield Reject(source, line, f"no {field!r} field", key, line)
                continue
            try:
                normal = split_address(address)[0]
            except InputError as exc:
                yield Reject(source, line, exc.reason, key, line)
                continue
            dotted = None
            if normal != address:  # "r@x.example.": its key, envelope and merge field are "r@x.example"
                dotted, address = address, normal
                row = {**row, field: normal}
            occurrence = 0
            take_key = self.row_key(address)
            if take_key in seen:
                if not duplicates_allowed:
                    yield Reject(source, line, f"duplicate recipient {address!r} in this campaign: sent once", key, line)
                    continue
                while take_key in seen:
                    occurrence += 1
                    take_key = self.row_key(address, occurrence)
            seen.add(take_key)
            if check_taken and (take_key in taken or (dotted is not None and self.row_key(dotted, occurrence) in taken)):
                continue  # sent by an earlier run (one of before 2026-12-06 took "r@x.example." by that key)
            if sunset is not None:
                verdict = sunset(row, address)
                if verdict is not None:
                    why, engaged = verdict
                    if engaged is None:
                        yield Reject(source, line, why, key, line)
                    else:
                        yield Sunset(source, line, why, key, line, recipient=address, campaign=self.id,
                                     last_engaged=engaged)
                    continue
            try:
                message = self.compiled.render(row, recipient_id=address)
            except InputError as exc:
                yield Reject(source, line, exc.reason if exc.source is None else str(exc), key, line)
                continue
            except (ValueError, TypeError) as exc:  # a value no check above foresaw: this row only, never the rest
                yield Reject(source, line, f"cannot render this row: {type(exc).__name__}: {exc}", key, line)
                continue
            envelope_sender = sender
            extra = b""
            if return_path is not None:
                envelope_sender = return_path.address(self.id, address)
                extra = return_path.trace_header(self.id, address)
                if not self._has_feedback_id:
                    extra += f"Feedback-ID: {self._feedback_id}\r\n".encode()
            if unsubscribe is not None:
                try:
                    one_click = unsubscribe.headers(self.id, address)
                except ValueError as exc:
                    yield Reject(source, line, str(exc), key, line)
                    continue
                if self._has_list_unsubscribe_post:
                    one_click = one_click[: one_click.index(b"List-Unsubscribe-Post:")]
                extra += one_click
            if extra:
                message = extra + message
            sign = None
            if self.signer is not None:
                if sign_later and (self.signer.costly or len(message) > _SIGN_LATER_BYTES):
                    sign = self.signer.sign  # the consumer signs it, on a thread
                else:
                    message = self.signer.sign(message)
            yield SpoolItem(message, envelope_sender, [address], source, line, meta, key, line, take_key, sign)


    def _sunset_check(self) -> SunsetCheck | None:
        """The sunset policy as a function of (row, address) -> None (send) or (reason, last engaged);
        last engaged None: the field is unreadable (the row is rejected). None without a policy."""
        c = self.job.campaign
        days, every, field = c.sunset_days, c.sunset_every, c.engagement_field
        if days is None:
            return None
        cutoff = (self.today or datetime.date.today()) - datetime.timedelta(days=days)

        def check(row: dict[str, Any], address: str) -> tuple[str, str | None] | None:
            value = row.get(field)
            if value is None or (isinstance(value, str) and not value.strip()):
                return None  # nothing says it is inactive
            engaged = _date(value)
            if engaged is None:
                return f"field {field!r}: not an ISO date: {str(value)[:40]!r}", None
            if engaged >= cutoff:
                return None
            if every is not None and row_key(self.id, address.lower(), "sunset") % every == 0:
                return None  # this campaign is its turn
            why = f"inactive since {engaged.isoformat()} (over {days} days)"
            if every is not None:
                why += f": sent one campaign in {every} only"
            return why, engaged.isoformat()

        return check


def _date(value: Any) -> datetime.date | None:
    """An ISO date or date-time (a JSON number is not one)."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value.strip()).date()
    except ValueError:
        return None


def _csv_rows(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line, row, error) of a recipients CSV (csv.DictReader's reading, its line numbers made exact).

    A record may run over several lines (a quoted cell with line breaks), and
    a quote left open (``"Eve,Smith,...``) makes one run on to the next quote,
    taking the rows between into one cell. Such a record is never sent (a
    merge value cannot hold a line break) and is reported at its *first* line
    with the range it took, so the rows it swallowed are named, not silently
    skipped (they were, reported once at the last line). It is not re-read
    line by line: a line inside a real multi-line cell (an address in a note)
    would then become a recipient.
    """
    reader = csv.DictReader(lines)
    try:
        for row in reader:
            end = reader.line_num
            # Line breaks inside cells (a quote open to the end of the file also holds the last line's own).
            cells = {k: v.rstrip("\r\n") for k, v in row.items() if isinstance(v, str)}
            broken = {k: v.count("\n") + v.count("\r") - v.count("\r\n") for k, v in cells.items()}
            breaks = sum(broken.values())
            if breaks:
                start = end - breaks
                names = ", ".join(repr(k) for k, n in broken.items() if n)
                yield start, None, (f"field {names} holds a line break, lines {start}-{end} (a merge value is one "
                                    f"line; or a quote was left open): none of these {end - start + 1} lines was "
                                    "read as a row")
                continue
            if None in row:
                yield end, None, "more fields than the header row"
                continue
            if any(isinstance(v, str) and _NOT_UTF8.search(v) for v in row.values()):
                yield end, None, "not valid UTF-8"
                continue
            yield end, row, None
    except csv.Error as exc:
        # The reader cannot go on past this point: the rest of the file is not
        # read. Reported as a failure of the whole input (row 0), so the job is
        # not marked done and a rerun, after the file is fixed, takes the rows
        # from where this one stopped.
        yield 0, None, f"unreadable CSV after line {reader.line_num}: {exc}; the rest of the file was not read"


def merge_field_error(row: dict[str, Any]) -> str | None:
    """Why a row's merge values cannot go into a message (its line is reported, the rest read), or None."""
    # Merge values must never carry line breaks or NUL into a message: even
    # where the template would neutralize them, a row that has them is
    # broken input and is reported rather than silently altered.
    for key, value in row.items():
        if isinstance(value, str):
            if any(c in value for c in _FORBIDDEN):
                return f"field {key!r} contains CR, LF or NUL"
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    # A JSON "\ud800": no text a message can carry. It once stopped the whole reading,
                    # on every run, where it reached the header encoder or the address check.
                    return f"field {key!r} is not valid Unicode (a lone surrogate, e.g. \\ud800 in JSON)"
        elif isinstance(value, (list, dict)):
            # A JSON array or object would be rendered as Python's repr of it, escapes and all.
            return f"field {key!r} is a JSON {'array' if isinstance(value, list) else 'object'}, not a text or number"
    return None


def _describe(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    if text.startswith("Object contains unknown field"):
        key = text.split("`")[1] if "`" in text else "?"
        path = text.rsplit("$", 1)[-1].rstrip("`") if "$" in text else ""
        return f"unknown key {path.lstrip('.') + '.' if path.strip('.') else ''}{key}"
    return text


def _feedback_field(value: str) -> str:
    """A Feedback-ID field: no colon (the separator), nothing that could break the header line."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:64] or "x"
