"""Queued mail and accounting are never world-readable, even for a library user with a permissive umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastmta.delivery.accounting import AccountingLog
from fastmta.queue.records import Outcome, Status
from fastmta.queue.spool import Spool
from fastmta.smtp.reply import Reply


def test_spool_and_accounting_files_are_never_world_readable_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the common default: files 0644, directories 0755
    try:
        spool = Spool(tmp_path / "q")
        spool.add_message_sync("m1", "a@b.example", ["c@d.example"], b"Subject: x\r\n\r\nbody\r\n")
        spool.close_sync()
        log = AccountingLog(tmp_path / "acct.jsonl")
        log.write(Outcome("m1", "c@d.example", Status.DELIVERED, Reply(250, ["ok"], "2.0.0"), 1, 0.0, 1.0))
        log.close()
    finally:
        os.umask(old)
    made = [tmp_path / "q", *(tmp_path / "q").rglob("*"), tmp_path / "acct.jsonl"]
    assert any(p.suffix == ".dat" for p in made) and (tmp_path / "q" / "journal").exists()
    for path in made:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o007 == 0, f"{path.relative_to(tmp_path)} is {oct(mode)}"  # nothing for others
