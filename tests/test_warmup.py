"""Warm-up schedule: advance on a good day, hold otherwise, quotas and their waits."""

from __future__ import annotations

import msgspec
import pytest

from fastmta.delivery.warmup import Warmup, WarmupConfig, WarmupState

DAY = 86400.0


def warm(**kw: object) -> tuple[Warmup, list[tuple[int | None, int | None, str, float]]]:
    changes: list[tuple[int | None, int | None, str, float]] = []
    cfg = msgspec.convert({"schedule": [50, 100, 200], **kw}, WarmupConfig)
    return Warmup(cfg, 0.0, on_change=lambda *a: changes.append(a)), changes


def send_day(w: Warmup, day: int, sent: int, deferred: int = 0, bounced: int = 0) -> None:
    t = day * DAY + 10
    for _ in range(sent):
        assert w.check(t).allowed
        w.take(t)
    w.record(t, delivered=sent - deferred - bounced, deferred=deferred, bounced=bounced)


def test_default_schedule() -> None:
    assert WarmupConfig().schedule[:6] == [50, 100, 200, 500, 1000, 2000]


def test_quota_then_wait_until_next_day() -> None:
    w, _ = warm(overflow=True)
    send_day(w, 0, 50)
    d = w.check(3600.0)
    assert not d.allowed and d.remaining == 0 and d.opens_at == DAY and d.overflow
    assert w.check(DAY).allowed and w.quota == 100


def test_advances_on_clean_days_to_warm() -> None:
    w, changes = warm()
    send_day(w, 0, 50, deferred=4, bounced=2)  # 8% deferred, 4% bounced: under 10% / 5%
    send_day(w, 1, 100)
    send_day(w, 2, 200)
    w.check(3 * DAY)
    assert w.warm and w.quota is None and w.check(3 * DAY).remaining is None
    assert [(o, n) for o, n, _, _ in changes] == [(50, 100), (100, 200), (200, None)]
    assert "advanced to 100/day" in changes[0][2] and changes[0][3] == DAY


@pytest.mark.parametrize(
    ("deferred", "bounced", "sent", "why"),
    [(6, 0, 50, "deferrals over 10.0%"), (0, 3, 50, "bounces over 5.0%"), (0, 0, 20, "proves nothing")],
)
def test_holds_on_a_bad_or_quiet_day(deferred: int, bounced: int, sent: int, why: str) -> None:
    w, changes = warm()
    send_day(w, 0, sent, deferred=deferred, bounced=bounced)
    assert w.check(DAY).remaining == 50
    assert changes[-1][0] == changes[-1][1] == 50 and why in changes[-1][2]
    send_day(w, 1, 50)  # a good day after a bad one advances
    w.check(2 * DAY)
    assert w.quota == 100


def test_idle_days_change_nothing_and_state_round_trips() -> None:
    w, changes = warm()
    send_day(w, 0, 50)
    w.check(10 * DAY)
    assert w.quota == 100 and len(changes) == 1
    w2 = Warmup(w.config, 10 * DAY, state=w.state())
    assert w2.state() == WarmupState(step=1, day=10)


def test_config_errors() -> None:
    with pytest.raises(msgspec.ValidationError, match="must not decrease"):
        msgspec.convert({"schedule": [100, 50]}, WarmupConfig)
    with pytest.raises(msgspec.ValidationError, match="empty"):
        msgspec.convert({"schedule": []}, WarmupConfig)
