"""Run `fastmta serve` and `fastmta sink` as child processes on loopback for tests; stop them by PID.

Both bind port 0 and say what they bound (the sink on stdout, the service in
DATA_DIR/listening.json), so no test ever guesses a free port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmta.cli.sinkproc import embedded_sink

__all__ = ["Served", "capture_sink", "raw_smtp_message", "serve_config", "served", "start_serve", "stop_serve"]


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    config_path: Path
    listening: dict[str, Any] = field(default_factory=dict)

    @property
    def smtp(self) -> tuple[str, int]:
        host, port = self.listening["smtp"][0].rsplit(":", 1)
        return host, int(port)

    @property
    def http(self) -> str:
        return f"http://{self.listening['http']}"

    @property
    def admin_socket(self) -> str:
        return str(self.listening["admin_socket"])

    def accounting(self) -> list[dict[str, Any]]:
        path = self.data_dir / "accounting.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_accounting(self, pred: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        records = self.accounting()
        while time.monotonic() < deadline and not pred(records):
            time.sleep(0.1)
            records = self.accounting()
        return records


def short_dir() -> Path:
    """A directory with a short path: a unix socket path may not pass ~100 bytes."""
    return Path(tempfile.mkdtemp(prefix="fm", dir="/tmp"))


def serve_config(
    data_dir: Path, relay: tuple[str, int] | None, *, extra: str = "", serve_extra: str = "", smtp: bool = True,
    http: bool = True, tokens: Sequence[tuple[str, str]] = (), users: Sequence[tuple[str, str]] = (),
) -> str:
    """A configuration for a test service: listeners on port 0, everything routed to *relay*."""
    lines = []
    if relay is not None:
        lines += ["[routing.static]", f'"*" = ["{relay[0]}:{relay[1]}"]', ""]
    lines += ["[smtp]", 'tls = "never"', "", '[sites."*".adaptive]', "enabled = false", ""]
    lines += [extra, "", "[serve]", 'hostname = "mta.test.example"', f'data_dir = "{data_dir}"']
    lines += [f'admin.socket = "{short_dir() / "admin.sock"}"']
    lines += [serve_extra]
    if smtp:
        lines += ["[[serve.smtp]]", 'listen = "127.0.0.1:0"']
    if http:
        lines += ["[serve.http]", 'listen = "127.0.0.1:0"']
        for name, digest in tokens:
            lines += ["[[serve.http.tokens]]", f'name = "{name}"', f'sha256 = "{digest}"']
    for name, hashed in users:
        lines += ["[[serve.users]]", f'name = "{name}"', f'password_hash = "{hashed}"']
    return "\n".join(lines) + "\n"


def start_serve(config_path: Path, data_dir: Path, *, timeout: float = 30.0, env: dict[str, str] | None = None,
                args: Sequence[str] = ()) -> Served:
    listening = data_dir / "listening.json"
    if listening.exists():
        listening.unlink()
    log = open(data_dir.parent / f"{data_dir.name}-serve.log", "ab")  # noqa: SIM115 - the child's stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmta", "serve", "--config", str(config_path), *args],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env={**os.environ, **(env or {})},
    )
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fastmta serve exited with {proc.returncode}: {_log_tail(data_dir)}")
        if listening.exists():
            info = json.loads(listening.read_text())
            if info.get("pid") == proc.pid:
                return Served(proc, data_dir, config_path, info)
        time.sleep(0.05)
    proc.kill()
    proc.wait(5)
    raise RuntimeError(f"fastmta serve did not start in {timeout}s: {_log_tail(data_dir)}")


def _log_tail(data_dir: Path) -> str:
    path = data_dir.parent / f"{data_dir.name}-serve.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def serve_log(served: Served) -> str:
    return _log_tail(served.data_dir)


def stop_serve(served: Served, *, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    if served.proc.poll() is None:
        served.proc.send_signal(sig)
        try:
            served.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait(5)
    return served.proc.returncode


@contextmanager
def served(config_path: Path, data_dir: Path, **kw: Any) -> Iterator[Served]:
    s = start_serve(config_path, data_dir, **kw)
    try:
        yield s
    finally:
        stop_serve(s)


@contextmanager
def capture_sink(capture: Path, *extra: str) -> Iterator[tuple[str, int]]:
    """A `fastmta sink` child that writes every accepted message into *capture*."""
    with embedded_sink(["--capture", str(capture), "--no-starttls", *extra]) as address:
        yield address


def captured(capture: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(capture.glob("*.eml"))]


async def raw_smtp_message(host: str, port: int, envelope: bytes, content: bytes) -> bytes:
    """One message over a socket of our own (a client library would tidy bytes a test needs as they are):
    *envelope* (EHLO ... DATA) until the 354, then *content*, the dot and QUIT; the replies after the 354."""
    import asyncio

    reader, writer = await asyncio.open_connection(host, port)
    writer.write(envelope)
    await writer.drain()
    seen = b""
    while b"354 " not in seen:
        chunk = await asyncio.wait_for(reader.read(4096), 10)
        if not chunk:
            raise AssertionError(f"no 354: {seen!r}")
        seen += chunk
    writer.write(content + b".\r\nQUIT\r\n")
    rest = b""
    while b"221 " not in rest:
        chunk = await asyncio.wait_for(reader.read(4096), 10)
        if not chunk:
            break
        rest += chunk
    writer.close()
    return rest
