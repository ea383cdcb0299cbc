"""Reading a spool directory: pickup files and campaign jobs, as a stream of work.

The reader yields, for every input (a pickup file or a campaign job):
:class:`InputStart`, then :class:`SpoolItem` (one message for some
recipients) or :class:`Reject` (input that could not be used, with file, line
and reason), then :class:`InputEnd`. It never stops at bad input and never
loads a whole campaign's recipients into memory: items are produced one at a
time as the engine takes them.

Resuming: a ``resume(key, fingerprint)`` callback says, per input, from which
row to start (0: all of it) or that it is finished (None: skip it). Rows are
pickup files' 0 and campaigns' recipients-file line numbers; the fingerprint
changes when the input's files change, so an edited input starts afresh.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from fastmta.errors import InputError
from fastmta.intake.campaign import Campaign
from fastmta.intake.items import Event, InputEnd, InputSkipped, InputStart, Reject, Resume, SpoolItem
from fastmta.intake.pickup import read_pickup

__all__ = [
    "Event",
    "InputEnd",
    "InputSkipped",
    "InputStart",
    "Reject",
    "Resume",
    "SpoolItem",
    "SpoolReader",
    "fingerprint",
]


def fingerprint(*paths: Path) -> str:
    """Changes when any of *paths* is modified (mtime and size)."""
    parts = []
    for p in paths:
        try:
            st = p.stat()
            parts.append(f"{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append("missing")
    return "/".join(parts)


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

    def __init__(self, directory: Path, resume: Resume | None = None) -> None:
        self.directory = directory
        self.resume: Resume = resume or (lambda key, fp: 0)

    def __iter__(self) -> Iterator[Event]:
        try:
            entries = sorted(self.directory.iterdir())
        except OSError as exc:
            yield Reject(str(self.directory), None, f"cannot list directory: {exc.strerror or exc}")
            return
        # Hidden names are skipped: files being written (sink capture writes
        # .name.tmp then renames) and the queue directory itself.
        visible = [p for p in entries if not p.name.startswith(".")]
        for path in visible:
            if path.suffix == ".eml":
                # Not only regular files: a dangling link or a directory named
                # *.eml is reported as unreadable rather than passed over.
                yield from self._input(path, (path,), self._pickup)
        for path in visible:
            if path.suffix == ".toml":
                unusable = _not_a_readable_file(path)
                if unusable is None:
                    yield from self._campaign(path)
                else:
                    # A job that cannot be opened (a link loop, a dangling
                    # link, a directory) is reported, never passed over.
                    yield from self._input(path, (path,), self._unreadable)

    def _input(
        self, path: Path, files: tuple[Path, ...], body: Callable[[Path, str, int], Iterator[SpoolItem | Reject]]
    ) -> Iterator[Event]:
        key = _key(path)
        fp = fingerprint(*files)
        start = self.resume(key, fp)
        if start is None:
            yield InputSkipped(key)
            return
        yield InputStart(key, fp)
        yield from body(path, key, start)
        yield InputEnd(key)

    def _unreadable(self, path: Path, key: str, start: int) -> Iterator[SpoolItem | Reject]:
        yield Reject(str(path), None, _not_a_readable_file(path) or "cannot read", key, 0)

    def _pickup(self, path: Path, key: str, start: int) -> Iterator[SpoolItem | Reject]:
        try:
            msg = read_pickup(path)
        except InputError as exc:
            yield Reject(str(path), exc.line, exc.reason, key, 0)
            return
        yield SpoolItem(msg.content, msg.sender, msg.recipients, str(path), meta={"file": path.name}, key=key)

    def _campaign(self, path: Path) -> Iterator[Event]:
        try:
            campaign = Campaign.load(path)
        except InputError as exc:
            key = _key(path)
            if self.resume(key, fingerprint(path)) is None:
                yield InputSkipped(key)
                return
            yield InputStart(key, fingerprint(path))
            yield Reject(exc.source or str(path), exc.line, exc.reason, key, 0)
            yield InputEnd(key)
            return
        yield from self._input(
            path, (path, campaign.recipients_path), lambda p, key, start: campaign.items(key, start)
        )
