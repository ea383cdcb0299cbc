"""Warm-up progress kept beside the spool's journal: a warm-up spans weeks of runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

from fastmta.delivery.warmup import WarmupState

log = logging.getLogger("fastmta.delivery.engine")

__all__ = ["WARMUP_FILE", "load_warmups", "save_warmups"]

#: Warm-up progress, kept beside the spool's journal: a warm-up spans weeks of runs.
WARMUP_FILE = "warmup.json"


class _SavedWarmup(msgspec.Struct, frozen=True):
    source: str
    site: str
    state: WarmupState


def load_warmups(path: Path) -> dict[tuple[str, str], WarmupState]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        saved = msgspec.json.decode(data, type=list[_SavedWarmup])
    except msgspec.DecodeError as exc:
        # Losing warm-up progress only makes sending slower, never unsafe: warn and start over.
        log.warning("%s: unreadable warm-up state (%s); warm-up starts again", path, exc)
        return {}
    return {(w.source, w.site): w.state for w in saved}


def save_warmups(path: Path, states: dict[tuple[str, str], WarmupState]) -> None:
    if not states:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode([_SavedWarmup(src, site, st) for (src, site), st in sorted(states.items())]))
    os.replace(tmp, path)
