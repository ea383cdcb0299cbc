"""What an operator is shown of one site queue: its throttle, connections, and why."""

from __future__ import annotations

from typing import Any

from fastmta.delivery.pool import SiteQueue
from fastmta.delivery.throttle import EventKind, ThrottleEvent

__all__ = ["describe_site_queue"]


def describe_site_queue(q: SiteQueue, now: float, offset: float) -> dict[str, Any]:
    """The throttle and connection state of *q*, and why (times: loop + *offset* = wall)."""
    t = q.throttle
    st = t.status(now)
    cut = next((e for e in reversed(t.events) if e.kind in (EventKind.SUSPEND, EventKind.HOLD) or (
        e.kind in (EventKind.WINDOW, EventKind.RATE) and e.old is not None and e.new is not None and e.new < e.old
    )), None)  # fmt: skip
    until, route, src = st.suspended_until, q.last_route, q.source.address
    down = [f"{a}:{h.port}" for h, a in route.targets() if q.health.is_down(src, a, h.port)] if route else []

    def event(e: ThrottleEvent | None) -> dict[str, Any] | None:
        return None if e is None else {
            "at": round(e.at + offset, 3), "kind": e.kind.value, "old": e.old, "new": e.new, "reason": e.reason,
        }  # fmt: skip

    return {
        "window": st.window, "rate": st.rate, "probing": st.probing,
        "suspended_until": round(until + offset, 3) if until is not None else None,
        "suspended_for": round(max(0.0, until - now), 3) if until is not None else 0.0,
        "warmup": {"quota": st.warmup_quota, "sent": st.warmup_sent} if st.warmup_quota is not None else None,
        "last_event": event(t.events[-1] if t.events else None), "last_throttle": event(cut),
        "reconnect_in": round(max(0.0, q.reconnect_at - now), 3), "hosts_down": down,
    }  # fmt: skip
