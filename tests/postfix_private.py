"""A private Postfix instance on loopback, for tests and benchmarks; never the machine's own Postfix.

``with private_postfix(relay=("127.0.0.1", 2525)) as pf:`` writes a main.cf
and master.cf into a new temporary directory, gives the instance its own
``config_directory``, ``queue_directory`` and ``data_directory`` there,
starts it with ``postfix -c DIR start`` and stops it with ``postfix -c DIR
stop`` (then ``abort``, then SIGKILL of the master PID read from
``QUEUE/pid/master.pid`` and of its children), every wait bounded. The
default instance (/etc/postfix, /var/spool/postfix) is never read or touched:
every command gets ``-c DIR``.

What the instance is:

* smtpd listens on ``127.0.0.1:PORT`` only (``inet_interfaces =
  loopback-only`` and the master.cf service name). Postfix cannot bind port 0
  and say which port it got, so a free port is picked and then the listener
  is PROVED to be ours: the greeting must carry a random token (it is in
  ``myhostname`` and in ``smtpd_banner``), as ``servers.postfix_smtp_sink``
  does for smtp-sink;
* ``mynetworks = 127.0.0.0/8``: loopback clients may relay;
* everything goes to *relay* (``relayhost = [HOST]:PORT``, plain SMTP, no
  TLS); without a relay, ``default_transport = error:...``;
* no DNS: ``smtp_dns_support_level = disabled``, ``smtp_host_lookup =
  native``, ``smtpd_peername_lookup = no``, and the relay is an IP literal;
* no local delivery: ``mydestination`` empty, no aliases, and
  ``local_transport = error:...`` (the caller may override any of these);
* no chroot (master.cf is ours), logging to ``ROOT/maillog`` through
  Postfix's own ``postlogd`` (``maillog_file``): this machine has no syslog;
* run as root: ``mail_owner = postfix``, ``setgid_group = postdrop``; the
  queue directories are made with the right owners by ``postfix start``
  itself (its check step runs ``post-install create-missing`` under
  ``-c DIR``; ``check=True`` also runs the full ``postfix check`` first,
  ~3 s) and the data directory is given to ``postfix`` here. ``postfix
  set-permissions`` is NOT used: it would also reset the permissions of the
  system-wide Postfix files.

Overrides: ``main_cf`` (parameter -> value, written last, so it wins),
``master_cf`` (extra master.cf lines, e.g. a transport), ``maps`` (name ->
{key: value}, written as ``texthash`` files into the config directory: refer
to them as ``texthash:$config_directory/NAME`` — Postfix expands
``$config_directory`` itself; no postmap needed). After start,
:meth:`PrivatePostfix.postconf` changes main.cf and reloads.

A receiving MTA that accepts everything for a domain and then bounces it
(an asynchronous DSN to the envelope sender, relayed to *relay*)::

    private_postfix(relay, main_cf={
        "mydestination": "rcv.example",
        "local_transport": "error:5.1.1 mailbox unavailable",
        "smtpd_reject_unlisted_recipient": "no",
    })

Without ``smtpd_reject_unlisted_recipient = no``, smtpd rejects at RCPT
(550, no DSN) every recipient that resolves to the ``error`` transport, and,
with ``local_recipient_maps = texthash:$config_directory/users`` and
``maps={"users": {...}}``, every local user not in the table. The ``error``
transport always bounces (a 4.X.X code in its text is ignored); use
``retry:`` for deferrals.

Holding mail: ``hold=True`` (or :meth:`PrivatePostfix.hold`) puts every
message smtpd accepts on the hold queue (``smtpd_end_of_data_restrictions =
check_client_access static:HOLD``: accepted, fsynced, not delivered);
:meth:`PrivatePostfix.release` removes that, reloads, moves the held mail to
the deferred queue (``postsuper -H ALL``) and asks for delivery now
(``postqueue -f``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from servers import free_port, greeting  # one proven-port helper for every server the tests start

__all__ = ["PostfixError", "PrivatePostfix", "private_postfix", "proc_alive", "proc_stat"]

SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
HOLD_SETTING = "check_client_access static:HOLD"
_CMD_TIMEOUT = 60.0


class PostfixError(RuntimeError):
    """A Postfix command failed or the instance did not come up; the message carries the log's tail."""


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))
    if path is None:
        raise PostfixError(f"{name} not found: install Debian's postfix package")
    return path


def proc_stat(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat from field 3 (state) on, or None if there is no such process.

    Index 0 is the state, 1 ppid, 2 pgrp, 11 utime, 12 stime, 13 cutime, 14 cstime (clock ticks).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(b")") + 2 :].split()


def proc_alive(pid: int) -> bool:
    """True if PID runs; a zombie (exited, not reaped yet: the master's parent is init) is not alive."""
    st = proc_stat(pid)
    return st is not None and st[0] not in (b"Z", b"X")


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not any(proc_alive(p) for p in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _fmt_main(settings: Mapping[str, str]) -> str:
    lines = []
    for key, value in settings.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", key) or "\n" in str(value):
            raise ValueError(f"bad main.cf setting {key!r} = {value!r}")
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


# No chroot anywhere (a chroot would need copies of /etc files in the queue directory), and only
# the services a relay needs. unpriv "-" runs a daemon as mail_owner.
_MASTER_CF = """\
# service  type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class PrivatePostfix:
    """A running private instance (made by :func:`private_postfix`)."""

    root: Path
    host: str
    port: int = 0
    token: str = ""
    main_cf: dict[str, str] = field(default_factory=dict)
    master_cf_extra: list[str] = field(default_factory=list)
    _master_pid: int | None = None

    # -- layout ---------------------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    # -- commands -------------------------------------------------------------------------
    def run(self, tool: str, *args: str, timeout: float = _CMD_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Postfix command (postfix, postconf, postsuper, postqueue, ...) with ``-c CONFIG_DIR``."""
        # umask 022 for Postfix whatever this process's is (a test that ran the fastmta CLI in-process
        # leaves its 077): the queue directories Postfix makes must be readable by its own daemons.
        proc = subprocess.run([_tool(tool), "-c", str(self.config_dir), *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, umask=0o022)
        if check and proc.returncode != 0:
            raise PostfixError(f"{tool} {' '.join(args)} exited with {proc.returncode}: "
                               f"{(proc.stderr + proc.stdout).strip()}\n{self.log_tail()}")
        return proc

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def write_map(self, name: str, entries: Mapping[str, str]) -> str:
        """Write a ``texthash`` table into the config directory; returns ``texthash:PATH`` for main.cf."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"bad map name {name!r}")
        path = self.config_dir / name
        path.write_text("".join(f"{k} {v}\n" for k, v in entries.items()))
        path.chmod(0o644)
        return f"texthash:{path}"

    def write_config(self) -> None:
        (self.config_dir / "main.cf").write_text(_fmt_main(self.main_cf))
        master = _MASTER_CF.format(listen=f"{self.host}:{self.port}")
        extra = "".join(line.rstrip("\n") + "\n" for line in self.master_cf_extra)
        (self.config_dir / "master.cf").write_text(master + extra)

    def postconf(self, settings: Mapping[str, str], *, reload: bool = True) -> None:
        """Change main.cf parameters (an empty string sets an empty value; None-like removal: use :meth:`unset`)."""
        self.main_cf.update({k: str(v) for k, v in settings.items()})
        self.write_config()
        if reload:
            self.reload()

    def unset(self, *names: str, reload: bool = True) -> None:
        """Remove main.cf parameters (back to Postfix's defaults)."""
        for name in names:
            self.main_cf.pop(name, None)
        self.write_config()
        if reload:
            self.reload()

    def check(self) -> None:
        """``postfix check``: creates missing queue directories; fails on fatal configuration errors."""
        self.run("postfix", "check")

    def reload(self, *, wait: float = 10.0) -> None:
        """``postfix reload``: the master re-reads the configuration; daemons pick it up as they restart.

        Then waits (at most *wait* s) for the smtpd processes of the old configuration to exit, so that the
        next connection is served with the new one (an smtpd in a session finishes it first).
        """
        old = [pid for pid in self.processes() if _comm(pid) == "smtpd"]
        self.run("postfix", "reload")
        _wait_gone(old, wait)

    def flush(self) -> None:
        """``postqueue -f``: try every deferred message now."""
        self.run("postqueue", "-f")

    def hold(self) -> None:
        """Put every message smtpd accepts from now on on the hold queue (accepted and fsynced, not delivered)."""
        if self.main_cf.get("smtpd_end_of_data_restrictions", HOLD_SETTING) != HOLD_SETTING:
            raise ValueError("hold() uses smtpd_end_of_data_restrictions, which the caller has set")
        self.postconf({"smtpd_end_of_data_restrictions": HOLD_SETTING})

    def release(self) -> None:
        """Stop holding, and deliver what is held now (``postsuper -H ALL`` then ``postqueue -f``)."""
        if self.main_cf.get("smtpd_end_of_data_restrictions") == HOLD_SETTING:
            self.unset("smtpd_end_of_data_restrictions")
        self.run("postsuper", "-H", "ALL")
        self.flush()

    # -- state ----------------------------------------------------------------------------
    def queue_counts(self) -> dict[str, int]:
        """Queue files per queue (maildrop, incoming, active, deferred, hold); racy by nature, fine for polling."""
        counts = {}
        for name in QUEUES:
            n = 0
            for _dirpath, _dirs, files in os.walk(self.queue_dir / name):
                n += len(files)
            counts[name] = n
        return counts

    def queued(self) -> int:
        return sum(self.queue_counts().values())

    def wait_queue_empty(self, timeout: float = 30.0, poll: float = 0.05) -> bool:
        deadline = time.monotonic() + timeout
        while self.queued():
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True

    def sent_count(self) -> int:
        """Deliveries the log reports as ``status=sent`` (the log is written asynchronously: poll)."""
        return self.log_text().count(" status=sent ")

    @property
    def master_pid(self) -> int | None:
        """The master's PID from ``QUEUE/pid/master.pid`` (remembered at start), if it runs."""
        pid = self._master_pid
        if pid is None:
            with contextlib.suppress(OSError, ValueError):
                pid = int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        if pid is not None and proc_alive(pid) and _comm(pid) == "master":
            return pid
        return None

    def processes(self) -> list[int]:
        """PIDs of the master and every live process of this instance (the master's session and group)."""
        master = self._master_pid
        if master is None:
            return []
        pids = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                st = proc_stat(int(entry.name))
                if st is not None and int(st[2]) == master and st[0] not in (b"Z", b"X"):
                    pids.append(int(entry.name))
        return sorted(pids)

    # -- life -----------------------------------------------------------------------------
    def start(self, *, attempts: int = 5, timeout: float = 20.0) -> None:
        why = "no attempt made"
        for _ in range(attempts):
            self.port = free_port(self.host)
            self.write_config()
            proc = self.run("postfix", "start", timeout=timeout, check=False)
            pid = None
            with contextlib.suppress(OSError, ValueError):
                pid = int((self.queue_dir / "pid" / "master.pid").read_text().strip())
            if proc.returncode != 0 or pid is None or not proc_alive(pid):
                why = f"postfix start exited with {proc.returncode}: {(proc.stderr + proc.stdout).strip()}\n{self.log_tail()}"
                if pid is not None and proc_alive(pid):
                    self._master_pid = pid
                    self.stop()
                continue
            self._master_pid = pid
            deadline = time.monotonic() + timeout
            banner = None
            while time.monotonic() < deadline and proc_alive(pid):
                banner = greeting(self.host, self.port, 2.0)
                if banner is not None:
                    break
                time.sleep(0.05)
            if banner is not None and self.token.encode() in banner:
                return
            why = (f"port {self.port} answered with another server's greeting: {banner!r}" if banner
                   else f"smtpd did not answer on port {self.port}\n{self.log_tail()}")
            self.stop()
        raise PostfixError(f"could not start a private Postfix instance: {why}")

    def stop(self, timeout: float = 15.0) -> None:
        """``postfix stop``, then ``postfix abort``, then SIGKILL: the master and its process group, by PID."""
        master = self._master_pid
        if master is None:
            return
        family = self.processes()
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.run("postfix", "stop", timeout=timeout, check=False)
        if not _wait_gone([master, *family], timeout):
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self.run("postfix", "abort", timeout=timeout, check=False)
            if not _wait_gone([master, *family], 5.0):
                for pid in {master, *family, *self.processes()}:
                    st = proc_stat(pid)
                    # Only processes still in this instance's group: a PID may have been reused.
                    if st is not None and int(st[2]) == master:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                _wait_gone([master, *family], 5.0)
        self._master_pid = None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _base_settings(root: Path, host: str, token: str, relay: tuple[str, int] | None) -> dict[str, str]:
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": f"{token}.postfix.test",
        "mydomain": "postfix.test",
        "myorigin": "$myhostname",
        "mydestination": "",
        "relay_domains": "",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_banner": f"$myhostname ESMTP {token}",
        "smtpd_peername_lookup": "no",
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "lmtp_host_lookup": "native",
        "smtp_tls_security_level": "none",
        "smtpd_tls_security_level": "none",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "local_transport": "error:5.1.1 local delivery is disabled in this test instance",
        "biff": "no",
        "maillog_file": str(root / "maillog"),
        "maillog_file_prefixes": str(root),
    }
    if relay is not None:
        settings["relayhost"] = f"[{relay[0]}]:{relay[1]}"
    else:
        settings["default_transport"] = "error:5.3.0 no relay configured in this test instance"
    return settings


@contextmanager
def private_postfix(
    relay: tuple[str, int] | None,
    *,
    main_cf: Mapping[str, str] | None = None,
    master_cf: Sequence[str] = (),
    maps: Mapping[str, Mapping[str, str]] | None = None,
    hold: bool = False,
    check: bool = False,
    host: str = "127.0.0.1",
    keep: bool = False,
    start_timeout: float = 20.0,
    base_dir: str | os.PathLike[str] = "/tmp",
) -> Iterator[PrivatePostfix]:
    """Run a private Postfix instance relaying everything to *relay*; stop it and remove its files afterwards.

    Its files live in a new directory under *base_dir* (the queue's file system is part of what a
    benchmark measures: Postfix fsyncs every queue file); ``keep=True`` leaves them there.
    """
    if os.geteuid() != 0:
        raise PostfixError("a private Postfix instance needs root (its master runs as root, daemons as postfix)")
    try:
        postfix_user = pwd.getpwnam("postfix")
    except KeyError:
        raise PostfixError("no 'postfix' user: install Debian's postfix package") from None
    root = Path(tempfile.mkdtemp(prefix="pfx", dir=base_dir))
    # Daemons run as postfix and must reach their files: the temporary directory is 0700 otherwise.
    root.chmod(0o755)
    token = "pf" + secrets.token_hex(6)
    settings = _base_settings(root, host, token, relay)
    if hold:
        settings["smtpd_end_of_data_restrictions"] = HOLD_SETTING
    settings.update({k: str(v) for k, v in (main_cf or {}).items()})
    pf = PrivatePostfix(root=root, host=host, token=token, main_cf=settings, master_cf_extra=list(master_cf))
    try:
        for d in (pf.config_dir, pf.queue_dir):
            d.mkdir()
            d.chmod(0o755)  # whatever the umask
        pf.data_dir.mkdir()
        pf.data_dir.chmod(0o700)
        os.chown(pf.data_dir, postfix_user.pw_uid, 0)
        for name, entries in (maps or {}).items():
            pf.write_map(name, entries)
        pf.write_config()
        if check:
            pf.check()
        pf.start(timeout=start_timeout)
        yield pf
    finally:
        pf.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
