"""Spreading a load run over worker processes: split the spec, start them together, merge their reports.

``run_load_processes`` divides messages, connections and rate between N
spawned processes (:func:`split_spec`), starts them at one common wall-clock
time so that their open-loop schedules and time series line up, relays their
merged live progress, and merges their reports
(:func:`~fastmta.load.report.merge_results`). Each process runs
:func:`~fastmta.load.driver.run_load` in its own event loop.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fastmta.load.driver import run_load
from fastmta.load.report import LoadResult, Progress, merge_results
from fastmta.load.spec import LoadSpec


def split_spec(spec: LoadSpec, workers: int) -> list[LoadSpec]:
    """Divide messages, connections and rate between *workers* processes."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if spec.connections < workers:
        raise ValueError(f"--workers {workers} needs at least {workers} connections (one per process)")

    def share(total: int, k: int) -> int:
        return total // workers + (1 if k < total % workers else 0)

    return [
        replace(
            spec,
            messages=share(spec.messages, k) if spec.messages is not None else None,
            connections=share(spec.connections, k),
            rate=spec.rate / workers if spec.rate is not None else None,
            seed=spec.seed + k,
        )
        for k in range(workers)
    ]


def _child(spec: LoadSpec, wid: int, out: Any, go: Any, start: Any, progress_interval: float) -> None:
    """Process entry point: wait for the common start, run, send the report back."""
    import uvloop

    out.put(("ready", wid, None))
    if not go.wait(60):
        out.put(("error", wid, "no start signal from the parent"))
        return
    spec = replace(spec, start_at=start.value)

    def report(p: Progress) -> None:
        out.put(("progress", wid, p))

    try:
        result = uvloop.run(run_load(spec, report, progress_interval))
    except BaseException as exc:  # the parent must hear about any failure, not wait for it
        out.put(("error", wid, f"{type(exc).__name__}: {exc}"))
        return
    out.put(("result", wid, result))


def run_load_processes(
    spec: LoadSpec,
    workers: int,
    progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 0.5,
) -> LoadResult:
    """Run *spec* spread over *workers* processes; merge their reports.

    Processes are spawned (not forked: no inherited event loop), wait until
    all are ready, then start at one common wall-clock time so that their
    open-loop schedules and time series line up.
    """
    spec.check()
    parts = split_spec(spec, workers)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    start = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=_child, args=(part, k, out, go, start, progress_interval), daemon=True)
        for k, part in enumerate(parts)
    ]
    for p in procs:
        p.start()
    results: dict[int, LoadResult] = {}
    errors: list[str] = []
    latest: dict[int, Progress] = {}
    ready = 0
    deadline = time.monotonic() + 60.0
    try:
        while ready < workers and time.monotonic() < deadline:
            try:
                kind, wid, payload = out.get(timeout=0.5)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if kind == "ready":
                ready += 1
            elif kind == "error":
                errors.append(f"worker {wid}: {payload}")
        start.value = time.time() + 0.05
        go.set()
        deadline = time.monotonic() + spec.effective_timeout() + 15.0
        while len(results) + len(errors) < workers and time.monotonic() < deadline:
            try:
                kind, wid, payload = out.get(timeout=0.5)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs) and out.empty():
                    break
                continue
            if kind == "progress":
                latest[wid] = payload
                if progress is not None and len(latest) == workers:
                    progress(Progress.merge(list(latest.values())))
            elif kind == "result":
                results[wid] = payload
            elif kind == "error":
                errors.append(f"worker {wid}: {payload}")
    finally:
        for p in procs:
            p.join(timeout=2.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
    if not results:
        empty = LoadResult(target=f"{spec.host}:{spec.port}", messages_requested=spec.messages, workers=workers,
                           timed_out=True, errors={e: 1 for e in errors or ["no worker process reported"]})
        empty.derive()
        return empty
    merged = merge_results([results[k] for k in sorted(results)])
    merged.workers = workers
    if len(results) < workers:
        merged.timed_out = True
        merged.errors.update({e: 1 for e in errors} or {f"{workers - len(results)} worker process(es) did not report": 1})
        merged.derive()
    elif errors:
        merged.errors.update({e: 1 for e in errors})
    return merged


def default_workers() -> int:
    return max(1, (os.cpu_count() or 2) - 1)
