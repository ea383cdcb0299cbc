"""Shared fixtures: one integration suite, two event loops (asyncio and uvloop)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

T = TypeVar("T")

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOP_FACTORIES))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine to completion on the parametrized event loop kind."""
    factory = LOOP_FACTORIES[request.param]

    def _run(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)

    return _run


@pytest.fixture
def run_uvloop() -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run on uvloop only (for tests where the loop kind is not the point)."""

    def _run(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)

    return _run


@pytest.fixture
def world_writable_dir() -> Iterator[Path]:
    """A directory Postfix's tools can write to when they drop privileges to nobody.

    pytest's tmp_path lives under a 0700 directory, which `nobody` cannot enter.
    """
    path = Path(tempfile.mkdtemp(prefix="fastmta-test-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount a real, small filesystem (tmpfs of *size* bytes) for disk-full tests; unmounted afterwards.

    Needs root (CI runs as root); elsewhere the test is skipped and says why.
    """
    import os
    import subprocess

    mounted: list[Path] = []

    def make(size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("disk-full test needs root to mount a small tmpfs")
        point = tmp_path / f"smallfs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    try:
        yield make
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], check=False)
