"""Start servers nobody here wrote (Postfix's smtp-sink) on loopback, safely.

smtp-sink cannot bind port 0 and report it, so we pick a free port and then
prove the listener is really ours: smtp-sink greets with the hostname we gave
it (``-h TOKEN``), and a random token cannot come from someone else's server.
On these machines a second bind to a busy port can silently succeed, so the
check is not optional.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SBIN_PATHS = ("/usr/sbin", "/usr/local/sbin")


def find_postfix_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_PATHS))
    if path is None:
        raise RuntimeError(
            f"{name} not found: install Debian's postfix package (see .ci/run); "
            "interop tests need it and are not skipped"
        )
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def greeting(host: str, port: int, timeout: float) -> bytes | None:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = s.recv(512)
            s.sendall(b"QUIT\r\n")
            return data
    except OSError:
        return None


@dataclass
class PostfixSink:
    host: str
    port: int
    token: str
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@contextmanager
def postfix_smtp_sink(*extra: str, host: str = "127.0.0.1", backlog: int = 256) -> Iterator[PostfixSink]:
    """Run ``smtp-sink`` on a verified free loopback port; stop it afterwards."""
    exe = find_postfix_tool("smtp-sink")
    args_user = ["-u", "nobody"] if os.geteuid() == 0 else []
    last_error = "no attempt"
    for _attempt in range(5):
        token = "sink" + secrets.token_hex(6)
        port = free_port(host)
        proc = subprocess.Popen(
            [exe, *args_user, "-h", token, *extra, f"{host}:{port}", str(backlog)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 5.0
        ok = False
        while time.monotonic() < deadline and proc.poll() is None:
            banner = greeting(host, port, 1.0)
            if banner is not None:
                ok = token.encode() in banner
                break
            time.sleep(0.02)
        if ok:
            try:
                yield PostfixSink(host, port, token, proc)
            finally:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            return
        proc.kill()
        _, err = proc.communicate(timeout=5)
        last_error = err.decode(errors="replace").strip() or "port answered with another server's banner"
    raise RuntimeError(f"could not start smtp-sink: {last_error}")
