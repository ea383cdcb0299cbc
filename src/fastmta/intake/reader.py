"""Reading a spool directory: pickup files and campaign jobs, as a stream of work.

The reader yields, for every input (a pickup file or a campaign job):
:class:`InputStart`, then :class:`SpoolItem` (one message for some
recipients) or :class:`Reject` (input that could not be used, with file, line
and reason), then :class:`InputEnd` (except the pickup files' input, which
never ends: see below). It never stops at bad input and never
loads a whole campaign's recipients into memory: items are produced one at a
time as the engine takes them.

Exactly once: what identifies an input is its content, not its name.

* A pickup file is the SHA-256 of its bytes: touched, renamed, or in a
  renamed spool directory, it is the message already sent. All pickup files
  are rows of one input, ``pickup:files``, whose taken keys are those hashes
  (64 bits of them). Why one input and not one per file: an input costs a
  state object and two journal records; per file that was most of a pickup
  run's memory and a tenth of its CPU. Queues written when each file was its
  own input (``pickup:<hash>``) are still honoured: a file done there is
  skipped.
* A campaign is its ``[campaign] id`` (key ``campaign:<id>``; the TOML file's
  name when it has none), and each row is its recipient within the campaign
  (a 64-bit key of id + address), so appending rows to a finished campaign's
  CSV, or reordering it, sends exactly the rows not sent before. A recipient
  twice in one campaign is sent once; the repeat is reported, unless the job
  sets ``allow_duplicates = true``.

A ``resume(key, fingerprint)`` callback says where to take an input up
(:class:`ResumePoint`: the keys of rows already taken, and, while the
content hash is unchanged, the row to start from) or that it is finished
(None). The taken keys come from the queue, which records them in the same
journal record that accepts each message.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from fastmta.errors import InputError
from fastmta.intake.campaign import Campaign
from fastmta.intake.items import (
    Event,
    InputEnd,
    InputSkipped,
    InputStart,
    Reject,
    Resume,
    ResumePoint,
    SpoolItem,
    record_text,
)
from fastmta.intake.pickup import parse_pickup, read_pickup_bytes
from fastmta.keyset import KeySet
from fastmta.message.headers import with_missing_fields
from fastmta.message.returnpath import ReturnPath
from fastmta.message.unsubscribe import Unsubscribe

#: The one input every pickup file is a row of (its take key: the file's content hash).
PICKUP_INPUT = "pickup:files"

__all__ = [
    "PICKUP_INPUT",
    "Event",
    "InputEnd",
    "InputSkipped",
    "InputStart",
    "Reject",
    "Resume",
    "ResumePoint",
    "SpoolItem",
    "SpoolReader",
    "content_hash",
]


def content_hash(*paths: Path) -> str:
    """SHA-256 over the bytes of *paths* (in order): what identifies an input, not its name or mtime."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\x00--fastmta-input-boundary--\x00")
    return h.hexdigest()


def _key(path: Path) -> str:
    """The input's name in the queue's records: its resolved path (a link loop cannot be resolved: then as given)."""
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return str(path.absolute())


def _not_a_readable_file(path: Path) -> str | None:
    """Why *path* cannot be read as a file, or None."""
    try:
        st = path.stat()
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        return "cannot read: is a directory"
    if not stat.S_ISREG(st.st_mode):
        return "cannot read: not a regular file"
    return None


class SpoolReader:
    """Iterates a spool directory: ``*.eml`` first (sorted), then ``*.toml`` jobs."""

    def __init__(
        self, directory: Path, resume: Resume | None = None, return_path: ReturnPath | None = None,
        accept: Callable[[str], bool] | None = None, unsubscribe: Unsubscribe | None = None,
        sign_later: bool = False, confined: bool = False,
    ) -> None:
        self.directory = directory
        #: Campaign jobs' keys and recipients files must be inside the directory (see Campaign.load).
        self.confined = confined
        #: Which entries to read now, given each one's path as text (fastmta serve's pickup leaves files
        #: still being written for later).
        self.accept = accept
        self.resume: Resume = resume or (lambda key, fp: ResumePoint())
        self.return_path = return_path
        #: RFC 8058 one-click headers on campaign mail (fastmta.message.unsubscribe).
        self.unsubscribe = unsubscribe
        #: Costly DKIM signing left to the consumer (``Campaign.items``, ``SpoolItem.sign``).
        self.sign_later = sign_later
        self._pickup_started = False  # InputStart(PICKUP_INPUT) yielded
        #: The real name of each file whose name had to be escaped to go on record (see
        #: ``record_text``): for a consumer that moves or deletes files by the events' sources.
        self.real_paths: dict[str, str] = {}

    def __iter__(self) -> Iterator[Event]:
        try:
            # Names sorted as strings: the order sorted Paths of one directory
            # have, without comparing Path objects (~7 µs a file at 30,000).
            names = sorted(os.listdir(self.directory))
        except OSError as exc:
            yield Reject(str(self.directory), None, f"cannot list directory: {exc.strerror or exc}")
            return
        # Each entry as text, exactly str(directory / name), without a Path
        # per file: making one and formatting it cost ~15 µs a pickup file in
        # a `send` run (3-5% of its CPU), and only campaign jobs need one.
        prefix = str(self.directory / "_")[:-1]
        # Hidden names are skipped: files being written (sink capture writes
        # .name.tmp then renames) and the queue directory itself.
        visible: list[str] = []
        for name in names:
            if name.startswith(".") or not name.endswith((".eml", ".toml")):
                continue
            if self.accept is None or self.accept(prefix + name):
                visible.append(name)
        # The pickup files taken in this reading: a second copy of one is the
        # same message (same content), skipped like one taken by an earlier
        # run. The queue's own taken keys only show a file once its message is
        # accepted, which is after the reader has moved on.
        met = KeySet()
        for name in visible:
            if name.endswith(".eml"):
                # Not only regular files: a dangling link or a directory named
                # *.eml is reported as unreadable rather than passed over.
                yield from self._pickup(prefix + name, name, met)
        ids: dict[str, Path] = {}  # campaign key -> the job that has it, in this reading
        for name in visible:
            if name.endswith(".toml"):
                path = self.directory / name
                unusable = _not_a_readable_file(path)
                if unusable is None:
                    yield from self._campaign(path, ids)
                else:
                    # A job that cannot be opened (a link loop, a dangling
                    # link, a directory) is reported, never passed over.
                    yield from self._unreadable(path)

    def _failed(self, path: Path, source: str, line: int | None, reason: str) -> Iterator[Event]:
        """An input that cannot be used at all: reported on every run until it is fixed (row 0)."""
        key = f"file:{record_text(_key(path))}"
        yield InputStart(key, "")
        yield Reject(source, line, reason, key, 0)
        yield InputEnd(key)

    def _unreadable(self, path: Path) -> Iterator[Event]:
        yield from self._failed(path, self._shown(path), None, _not_a_readable_file(path) or "cannot read")

    def _shown(self, path: Path | str) -> str:
        """*path* as it goes on record, its real name remembered when they differ (see ``real_paths``)."""
        text = str(path)
        shown = record_text(text)
        if shown is not text:
            # A file really named so (``a\xff.eml`` typed out), or another name escaped to the same text,
            # must not be taken for this one: serve deleted the wrong file of two such once they shared
            # one name on record.
            base = shown
            for n in range(1, 1001):
                if self.real_paths.get(shown, text) == text and not os.path.lexists(shown):
                    break
                shown = f"{base} (not UTF-8, {n})"
            self.real_paths[shown] = text
        return shown

    def _pickup(self, text: str, name: str, met: KeySet) -> Iterator[Event]:
        # A pickup file is identified by its content: touched, renamed or
        # moved to another spool, it is the same message, sent once.
        shown = self._shown(text)  # *text* itself unless the name is not UTF-8 (see record_text)
        if shown is not text:
            name = record_text(name)
        try:
            data = read_pickup_bytes(text)
        except InputError as exc:
            yield from self._failed(Path(text), shown, exc.line, exc.reason)
            return
        digest = hashlib.sha256(data).hexdigest()
        take_key = int(digest[:16], 16)
        if not self._pickup_started:
            self._pickup_started = True
            yield InputStart(PICKUP_INPUT, "")
        # Asked each time, not once: once the input is open its taken keys are
        # the queue's own (live). The pickup input is never "done" (new files come).
        point = self.resume(PICKUP_INPUT, "") or ResumePoint()
        legacy = self.resume(f"pickup:{digest}", "")  # a queue from when each file was an input
        if take_key in met:
            yield InputSkipped(f"pickup:{digest}", shown, "the same content as another file of this reading: sent once")
            return
        if take_key in point.taken or legacy is None or take_key in legacy.taken:
            yield InputSkipped(f"pickup:{digest}", shown, "the same content as a message already queued: sent once")
            return
        try:
            msg = parse_pickup(data, shown)
        except InputError as exc:
            yield from self._failed(Path(text), shown, exc.line, exc.reason)
            return
        met.add(take_key)
        # A file without Date or Message-ID gets them, as Postfix's pickup does (Gmail refuses mail
        # without a Message-ID); it is still known by its own bytes (take_key).
        content = with_missing_fields(msg.content, msg.sender.rpartition("@")[2] or "localhost")
        yield SpoolItem(
            content, msg.sender, msg.recipients, shown, meta={"file": name}, key=PICKUP_INPUT, take_key=take_key,
        )

    def _campaign(self, path: Path, ids: dict[str, Path]) -> Iterator[Event]:
        # A campaign is identified by its id; its rows by recipient (see
        # Campaign.items), so an edited recipients file sends only new rows.
        try:
            campaign = Campaign.load(path, confined=self.confined)
            fp = content_hash(path, campaign.recipients_path)
        except InputError as exc:
            source = exc.source if exc.source and exc.source != str(path) else None
            # The job itself: its real name remembered (serve moves it aside by it); another file: as said.
            yield from self._failed(path, record_text(source) if source else self._shown(path), exc.line, exc.reason)
            return
        except OSError as exc:
            yield from self._failed(path, self._shown(path), None, f"cannot read: {exc.strerror or exc}")
            return
        key = f"campaign:{campaign.id}"
        first = ids.setdefault(key, path)
        if first != path:
            # Two jobs, one id: one campaign whose rows are known by id + address. Reading both in one
            # run would take a row of each before either is on record (a copy of a job would be sent
            # twice); which one is meant is the operator's call.
            yield from self._failed(path, self._shown(path), None, f"campaign id {campaign.id!r} is also the id of "
                                    f"{first.name} in this spool: give each job its own [campaign] id")
            return
        point = self.resume(key, fp)
        if point is None:
            yield InputSkipped(key)
            return
        yield InputStart(key, fp)
        yield from campaign.items(key, point.row, point.taken, self.return_path, self.unsubscribe, self.sign_later)
        yield InputEnd(key)
