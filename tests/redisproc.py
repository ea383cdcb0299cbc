"""A real ``redis-server`` (Debian's package) on a free loopback port, for the cluster tests.

redis-server cannot bind port 0 and say which port it got, so a free port is
picked (bind 0, read it, close) and the server started on it; to be sure the
server answering there is ours and not a process that took the port in
between, ``INFO server``'s ``process_id`` must equal the child's PID. No
persistence (``--save "" --appendonly no``), its files in a private temp
directory. Stopped by PID only; :meth:`RedisProc.kill` and
:meth:`RedisProc.restart` (same port) serve the degraded-mode tests.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RedisProc", "have_redis", "redis_server"]

HOST = "127.0.0.1"


def have_redis() -> bool:
    return shutil.which("redis-server") is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _info_pid(port: int, timeout: float = 0.5) -> int | None:
    """``process_id`` from ``INFO server`` at *port* (RESP by hand: no client library needed), or None."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            data = b""
            while b"\r\n" not in data or len(data) < _bulk_end(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (OSError, ValueError):
        return None
    for line in data.split(b"\r\n"):
        if line.startswith(b"process_id:"):
            return int(line.split(b":", 1)[1])
    return None


def _bulk_end(data: bytes) -> int:
    """Where a RESP bulk string ``$N\\r\\n...\\r\\n`` ends (an error reply ends at its line)."""
    head, _ = data.split(b"\r\n", 1)
    if not head.startswith(b"$"):
        return len(head) + 2
    return len(head) + 2 + int(head[1:]) + 2


class RedisProc:
    """One redis-server child: ``url``, ``port``, ``pid``; kill/restart for the degraded-mode tests."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fmredis"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, port: int | None = None, attempts: int = 5) -> None:
        """Start on *port* (None: a free one); proven ours by its PID. Retries on a lost port race."""
        for _ in range(attempts):
            p = port if port is not None else _free_port()
            proc = subprocess.Popen(
                ["redis-server", "--port", str(p), "--bind", HOST, "--save", "", "--appendonly", "no",
                 "--dir", str(self.dir), "--loglevel", "warning", "--daemonize", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                if _info_pid(p) == proc.pid:
                    self.proc, self.port = proc, p
                    return
                time.sleep(0.02)
            self._stop(proc)
            if port is not None:
                time.sleep(0.2)  # the old server's port may still be closing
        raise RuntimeError("redis-server did not start on a port of its own")

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def kill(self) -> None:
        """SIGKILL the server (a crash: clients see connections reset / refused)."""
        if self.proc is not None:
            self._stop(self.proc, signal.SIGKILL)

    def restart(self) -> None:
        """Start again on the same port (an empty server: no persistence)."""
        self.kill()
        self.start(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self._stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisProc]:
    r = RedisProc()
    try:
        r.start()
        yield r
    finally:
        r.stop()
