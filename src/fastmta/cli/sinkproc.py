"""Start ``fastmta sink`` as a child process on loopback and find its port.

Used by ``--sink`` options: the sink runs in its own process so that it gets
its own core and the client's CPU figures stay the client's.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

_LISTENING = re.compile(r"listening on (\S+):(\d+)")


@contextmanager
def embedded_sink(extra_args: Sequence[str] = (), startup_timeout: float = 20.0) -> Iterator[tuple[str, int]]:
    """Yield (host, port) of a fresh ``fastmta sink --listen 127.0.0.1:0``; stop it afterwards."""
    cmd = [sys.executable, "-m", "fastmta", "sink", "--listen", "127.0.0.1:0", "--until-stdin-eof", *extra_args]
    # Its own session: a Ctrl-C at the terminal goes to the whole foreground
    # process group, and the sink must outlive the engine's drain (which still
    # delivers to it), not die first and turn the drain into false deferrals.
    # It is stopped below, after the caller is done; if this process dies
    # without getting there, the sink sees its stdin close and exits.
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + startup_timeout
        address: tuple[str, int] | None = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = _LISTENING.search(line)
            if m:
                address = (m.group(1).strip("[]"), int(m.group(2)))
                break
        if address is None:
            raise RuntimeError(f"embedded sink did not start (command: {' '.join(cmd)})")
        yield address
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
