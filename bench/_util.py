"""Shared helpers for the bench/ scripts: servers on loopback, and CPU accounting.

Everything here measures processes from the outside, so that a C program
(Postfix's smtp-source / smtp-sink) and a Python one are accounted for the
same way:

* a client is a child process; its CPU comes from ``os.wait4``, which returns
  the exact rusage of that one child (no ``RUSAGE_CHILDREN`` deltas that would
  also pick up any other child reaped in the same window);
* a server is a long-running child; its CPU is ``utime + stime`` from
  ``/proc/PID/stat`` sampled before and after each client run. That counter
  covers all threads of the process but ticks at ``SC_CLK_TCK`` (usually
  100 Hz, 10 ms), so runs must be long enough for the ticks not to matter.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/lib/postfix/sbin")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def find_tool(name: str) -> str:
    """Absolute path of a Postfix test tool; they live in sbin, which is often not on PATH."""
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))
    if path is None:
        raise RuntimeError(f"{name} not found: install Debian's postfix package (apt-get install postfix)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. Racy by nature: callers must verify who answers on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all its threads), in seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name (field 2) is in parentheses and may contain spaces, so
    # split after its closing parenthesis; utime and stime are fields 14 and 15.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass(frozen=True, slots=True)
class Server:
    """A server child process listening on loopback."""

    name: str
    host: str
    port: int
    pid: int

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after *grace* seconds; always reaps the child."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


def greeting(host: str, port: int, timeout: float) -> bytes | None:
    """The first bytes a server on host:port sends, or None if nothing listens there yet."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = s.recv(512)
            s.sendall(b"QUIT\r\n")
            return data
    except OSError:
        return None


@contextmanager
def postfix_smtp_sink(host: str = "127.0.0.1", backlog: int = 1024, extra: Sequence[str] = ()) -> Iterator[Server]:
    """Run Postfix's smtp-sink on a verified free port; stop it afterwards.

    smtp-sink cannot bind port 0 and tell us the port, so we choose one and
    then check that the greeting carries the random hostname we passed with
    ``-h``: on these machines a second bind to a busy port can silently
    succeed, and then a greeting alone would not prove the listener is ours.
    """
    exe = find_tool("smtp-sink")
    # smtp-sink refuses to run as root without a user to drop privileges to.
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    why = "no attempt made"
    for _attempt in range(5):
        token = "bench" + secrets.token_hex(6)
        port = free_port(host)
        # stderr goes to a file: smtp-sink may warn at any time, and a pipe
        # nobody reads during the benchmark could fill up and stall it.
        errfile = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the process is stopped
        proc = subprocess.Popen(
            [exe, *user, "-h", token, *extra, f"{host}:{port}", str(backlog)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errfile,
        )
        try:
            verified = False
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and proc.poll() is None:
                banner = greeting(host, port, 1.0)
                if banner is not None:
                    verified = token.encode() in banner
                    break
                time.sleep(0.02)
            if verified:
                yield Server("smtp-sink", host, port, proc.pid)
                return
            why = "the port answered with another server's greeting" if proc.poll() is None else "smtp-sink exited"
        finally:
            _stop(proc)
            errfile.seek(0)
            err = errfile.read().decode(errors="replace").strip()
            errfile.close()
            if err:
                why = err
    raise RuntimeError(f"could not start smtp-sink: {why}")


@contextmanager
def fastmta_sink(extra: Sequence[str] = (), startup_timeout: float = 20.0) -> Iterator[Server]:
    """Run ``python -m fastmta sink --listen 127.0.0.1:0`` and read the bound port from its output.

    The sink prints ``listening on ADDR:PORT`` once bound; port 0 means no
    race with other processes for the port. We keep the PID (which
    ``fastmta.cli.sinkproc.embedded_sink`` does not expose) to sample the
    sink's CPU.
    """
    cmd = [sys.executable, "-m", "fastmta", "sink", "--listen", "127.0.0.1:0", *extra]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    stdout = proc.stdout
    found: list[tuple[str, int]] = []
    ready = threading.Event()

    def read_output() -> None:
        # Keep draining stdout for the sink's whole life: a full pipe would
        # block the sink mid-benchmark and show up as a throughput collapse.
        for raw in stdout:
            line = raw.decode(errors="replace")
            if not found and line.startswith("listening on "):
                addr, _, port = line.split()[-1].rpartition(":")
                found.append((addr.strip("[]"), int(port)))
                ready.set()
        ready.set()  # EOF: the sink exited

    reader = threading.Thread(target=read_output, name="fastmta-sink-stdout", daemon=True)
    reader.start()
    try:
        ready.wait(startup_timeout)
        if not found:
            raise RuntimeError(f"fastmta sink did not report a listening address: {' '.join(cmd)}")
        host, port = found[0]
        yield Server("fastmta sink", host, port, proc.pid)
    finally:
        _stop(proc, grace=10.0)
        reader.join(5.0)
        stdout.close()


@dataclass(frozen=True, slots=True)
class ChildRun:
    """One finished client process, measured from the outside."""

    returncode: int
    wall_s: float  # fork/exec to exit as seen by the parent
    cpu_s: float  # user + system CPU of the child (and any children it reaped)
    stdout: bytes
    stderr: bytes
    timed_out: bool


def run_child(cmd: Sequence[str], timeout: float) -> ChildRun:
    """Run *cmd* to completion (killed after *timeout* s) and return its wall time and exact CPU.

    Output goes to temporary files rather than pipes so that the parent
    needs no reader thread competing for the CPU during the measurement, and
    so that the child can never block on a full pipe.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            proc.kill()

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        try:
            # wait4 reaps exactly this child and returns its own rusage.
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen the child is already reaped
        out.seek(0)
        err.seek(0)
        return ChildRun(
            returncode=proc.returncode, wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
            stdout=out.read(), stderr=err.read(), timed_out=killed.is_set(),
        )


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others (figures) right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


@dataclass(frozen=True, slots=True)
class DiskUsage:
    """Space taken by the files under a directory."""

    allocated: int  # bytes of disk blocks (st_blocks * 512): what the directory costs the disk
    apparent: int  # sum of file sizes
    files: int


def dir_usage(path: str | os.PathLike[str], max_depth: int = 4) -> DiskUsage:
    """Walk *path* (at most *max_depth* levels) and add up its files, tolerating concurrent changes.

    Meant for sampling a directory another process is writing: a file or
    subdirectory that disappears between listing and ``stat`` is skipped,
    not an error.
    """
    allocated = apparent = files = 0
    stack: list[tuple[str, int]] = [(os.fspath(path), 0)]
    while stack:
        current, depth = stack.pop()
        try:
            entries = list(os.scandir(current))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth < max_depth:
                        stack.append((entry.path, depth + 1))
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            allocated += st.st_blocks * 512
            apparent += st.st_size
            files += 1
    return DiskUsage(allocated, apparent, files)


def tree_rss_bytes(pid: int) -> int | None:
    """VmRSS of *pid* plus its direct children's (fastmta send's intake process), or None once it is gone."""
    own = proc_rss_bytes(pid)
    if own is None:
        return None
    total = own
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return own
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(proc_rss_bytes(int(c)) or 0 for c in f.read().split())
        except OSError:
            continue
    return total


def proc_rss_bytes(pid: int) -> int | None:
    """Current resident set size of a live process (VmRSS), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None
