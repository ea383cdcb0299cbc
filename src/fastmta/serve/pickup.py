"""The pickup directory, watched: ``fastmta send``'s inputs, taken exactly once while the service runs.

Every ``interval`` seconds the directory is read with the same reader and
the same exactly-once bookkeeping as ``fastmta send`` (inputs known by
content, each row's take journaled with its message). What differs is what
a long-running watcher must do about files:

* a file modified less than ``settle`` seconds ago is left for a later scan
  (it may still be being written; writers should write a dot-file and
  rename it, as Postfix's maildrop does, and then nothing waits);
* a pickup file durably queued is deleted (``delete = true``, Postfix's
  pickup does the same), or kept and skipped by content on later scans;
* with ``delete = true``, a file whose content was already queued (the same
  bytes dropped again, or a file queued just before a crash) is not sent
  again but moved to ``.duplicates/`` beside a ``.reason`` file and logged;
* a file that cannot be used at all (malformed, unreadable) is moved to
  ``.rejected/`` beside a ``.reason`` file, and reported once, instead of
  being reported again on every scan. Nothing is dropped silently.

Scanning (``iterdir``, ``stat``, reading and hashing files) is blocking
file I/O, so it runs in a worker thread; only submitting runs on the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastmta.errors import InputError
from fastmta.intake.items import Event, InputEnd, InputSkipped, InputStart, Reject, SpoolItem, Sunset
from fastmta.intake.progress import InputProgress, resume_from
from fastmta.intake.reader import PICKUP_INPUT, SpoolReader
from fastmta.message.returnpath import ReturnPath
from fastmta.message.unsubscribe import Unsubscribe
from fastmta.queue.journal_records import InputTake
from fastmta.queue.spool import Spool

log = logging.getLogger("fastmta.serve.pickup")

__all__ = ["PickupWatcher"]

Submit = Callable[[SpoolItem, InputTake | None], Awaitable[str]]

#: Events read per hop to the worker thread: a big campaign is streamed, not read whole into memory.
_CHUNK = 512


class PickupWatcher:
    """Scans one directory until stopped; hands each item to *submit* (durable when it returns)."""

    def __init__(
        self, directory: Path, spool: Spool, submit: Submit, *, interval: float = 1.0, settle: float = 1.0,
        delete: bool = True, return_path: ReturnPath | None = None, unsubscribe: Unsubscribe | None = None,
        rejects: Path | None = None,
        on_reject: Callable[[Reject], None] | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
        check: Callable[[Path], str | None] | None = None,
    ) -> None:
        self.directory = directory
        self.spool = spool
        self._submit = submit
        self.interval = interval
        self.settle = settle
        self.delete = delete
        self.return_path = return_path
        self.unsubscribe = unsubscribe
        self.rejects_file = rejects
        self._on_reject = on_reject
        self._on_record = on_record  # records that are not deliveries (sunset): accounting and webhooks
        #: ``fastmta check`` before a campaign starts: path -> None (go) or why it is refused. Blocking: it is
        #: called from the scanning thread, once per version of a job (cached by size and mtime).
        self._check = check
        self._checked: dict[Path, tuple[int, int, str | None]] = {}
        self._refused: list[tuple[Path, str]] = []
        self.tracker = InputProgress(spool)
        self.scans = 0
        self.submitted = 0
        self.rejected = 0
        self._window = asyncio.Semaphore(256)

    async def run(self, stop: asyncio.Event) -> None:
        """Scan every ``interval`` until *stop* is set; a scan in progress finishes its submits first."""
        while not stop.is_set():
            try:
                await self.scan(stop)
            except Exception:  # the next scan tries again; the service goes on
                log.exception("pickup scan of %s failed", self.directory)
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except TimeoutError:
                pass

    def _settled(self, text: str) -> bool:
        try:
            st = os.lstat(text)
        except OSError:
            return True  # vanished or unreadable: the reader reports it
        if time.time() - st.st_mtime < self.settle:
            return False
        if self._check is not None and text.endswith(".toml"):
            path = Path(text)
            seen = self._checked.get(path)
            if seen is None or seen[:2] != (st.st_size, st.st_mtime_ns):
                try:
                    why = self._check(path)
                except Exception:  # a checker bug must not stop the pickup directory: the campaign goes
                    log.exception("fastmta check of %s failed; the campaign is not held back by it", path)
                    why = None
                self._checked[path] = (st.st_size, st.st_mtime_ns, why)
                if why is not None:
                    self._refused.append((path, why))
            elif seen[2] is not None:
                return False
            return self._checked[path][2] is None
        return True

    async def scan(self, stop: asyncio.Event | None = None) -> int:
        """One pass over the directory; returns the messages submitted."""
        self.scans += 1
        spool_reader = SpoolReader(
            self.directory, resume_from(self.spool), self.return_path, accept=self._settled, unsubscribe=self.unsubscribe,
            confined=True,  # a job dropped here signs with keys, and reads lists, beside it only
        )
        reader = iter(spool_reader)
        # The events name a file whose name is not UTF-8 as it goes on record; moved or deleted by its real name.
        real = spool_reader.real_paths
        done_files: list[str] = []
        known: list[tuple[str, str]] = []  # files whose content was sent (or met) already, and why
        inflight: set[asyncio.Task[None]] = set()
        submitted = 0

        def chunk() -> list[Event]:
            out: list[Event] = []
            for event in reader:
                out.append(event)
                if len(out) >= _CHUNK:
                    break
            return out

        while stop is None or not stop.is_set():
            events = await asyncio.to_thread(chunk)
            while self._refused:  # campaigns `fastmta check` refused: reported once, moved aside
                path, why = self._refused.pop()
                self._reject(Reject(str(path), None, why))
                await asyncio.to_thread(self._quarantine, path, why)
                self._checked.pop(path, None)
            if not events:
                break
            for event in events:
                if isinstance(event, InputSkipped):
                    if event.source:
                        known.append((event.source, event.why))
                elif isinstance(event, InputStart):
                    self.tracker.start(event.key, event.fingerprint)
                elif isinstance(event, InputEnd):
                    self.tracker.end(event.key)
                elif isinstance(event, Sunset):
                    # The campaign's sunset policy left this recipient out: recorded, not bad input.
                    if self._on_record is not None:
                        self._on_record(event.as_record(time.time()))
                    self.tracker.issued(event.key, event.row)
                    self.tracker.taken(event.key, event.row)
                elif isinstance(event, Reject):
                    self._reject(event)
                    if event.key:
                        if event.row == 0:
                            self.tracker.failed(event.key)
                            source = real.get(event.source, event.source)
                            await asyncio.to_thread(self._quarantine, Path(source), event.reason)
                        self.tracker.issued(event.key, event.row)
                        self.tracker.taken(event.key, event.row)
                else:
                    await self._window.acquire()
                    self.tracker.issued(event.key, event.row)
                    task = asyncio.ensure_future(self._one(event, done_files))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                    submitted += 1
        if inflight:
            await asyncio.wait(set(inflight))
        if self.delete and done_files:
            await asyncio.to_thread(self._remove, [real.get(name, name) for name in done_files])
        if self.delete and known:
            # Known by content, not sent again (exactly once across a crash), but never deleted unsent: an
            # identical file dropped later (an alert repeated word for word) was deleted without a word.
            for name, why in known:
                log.warning("pickup %s: not sent: %s (moved to .duplicates/)", name, why)
                await asyncio.to_thread(self._quarantine, Path(real.get(name, name)), why, ".duplicates")
        return submitted

    async def _one(self, item: SpoolItem, done_files: list[str]) -> None:
        try:
            await self._submit(item, self.tracker.take(item))
        except InputError as exc:
            self._reject(Reject(item.source, item.line, exc.reason, item.key, item.row))
            self.tracker.taken(item.key, item.row)  # reported: not to be read again
        except Exception as exc:  # not accepted (e.g. the queue is not writable): the next scan tries again
            log.warning("pickup %s: not queued now, retried on the next scan: %s", item.source, exc)
            self.tracker.failed(item.key)
        else:
            self.submitted += 1
            self.tracker.taken(item.key, item.row)
            if item.key == PICKUP_INPUT:
                done_files.append(item.source)
        finally:
            self._window.release()

    def _reject(self, reject: Reject) -> None:
        self.rejected += 1
        log.warning("pickup rejected: %s", str(reject).encode("ascii", "backslashreplace").decode("ascii"))
        if self._on_reject is not None:
            self._on_reject(reject)
        if self.rejects_file is not None:
            try:
                with open(self.rejects_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"time": round(time.time(), 3), **reject.as_dict()}) + "\n")
            except OSError as exc:
                log.error("cannot record a rejected input in %s: %s", self.rejects_file, exc)

    def _quarantine(self, path: Path, reason: str, folder: str = ".rejected") -> None:
        """Move a file not sent aside (into *folder*), with why, so it is reported once and kept for the operator."""
        if path.parent != self.directory or not path.name or path.name.startswith("."):
            return  # a campaign's recipients file or the like: leave it where it is
        target_dir = self.directory / folder
        try:
            target_dir.mkdir(mode=0o700, exist_ok=True)
            target = target_dir / path.name
            if target.exists():
                target = target_dir / f"{path.stem}.{time.time_ns()}{path.suffix}"
            os.replace(path, target)
            target.with_name(target.name + ".reason").write_text(reason + "\n", encoding="utf-8")
        except OSError as exc:
            log.error("cannot move %s aside into %s: %s", path, folder, exc)

    def _remove(self, files: list[str]) -> None:
        for name in dict.fromkeys(files):
            path = Path(name)
            if path.suffix != ".eml" or path.parent != self.directory:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cannot delete queued pickup file %s: %s", path, exc)
