"""What serve keeps of the mail to its receive domains (fastmta.serve.inbound_store)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastmta.serve.inbound_store import prune_kept


def test_what_nobody_could_read_is_kept_for_a_while_and_within_a_size(tmp_path: Path) -> None:
    # Found by an attack on serve: anyone may mail the receive domains, and what the feedback processor
    # cannot read was kept without end: 50 MB messages filled the disk until the service was not ready.
    kept = tmp_path / "unrecognized"
    kept.mkdir()
    now = time.time()
    for name, age_days, size in (("old.eml", 40, 10), ("a.eml", 3, 400), ("b.eml", 2, 400), ("c.eml", 1, 400)):
        path = kept / name
        path.write_bytes(b"x" * size)
        os.utime(path, (now - age_days * 86400, now - age_days * 86400))
    assert prune_kept(kept, 30 * 86400, 10_000) == 1  # past 30 days
    assert sorted(p.name for p in kept.iterdir()) == ["a.eml", "b.eml", "c.eml"]
    assert prune_kept(kept, 30 * 86400, 900) == 1  # over 900 bytes: the oldest goes first
    assert sorted(p.name for p in kept.iterdir()) == ["b.eml", "c.eml"]
    assert prune_kept(kept, 30 * 86400, 900) == 0 and prune_kept(tmp_path / "none", 1, 1) == 0
