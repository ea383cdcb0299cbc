"""The reputation guard: brakes that stop a campaign, or an egress source, before it burns the sender.

Fed with every outcome (an engine listener) and every record of what came
back (complaints, unsubscribes, late bounces: :meth:`Guard.note_record`),
it keeps the live KPIs (:mod:`fastmta.delivery.kpi`) and acts on them with
the thresholds of ``[guard]`` (:mod:`fastmta.delivery.guard_config`):

**Campaign brake.** A campaign (the ``job`` meta key) is paused through the
queue control — ``suspend("campaign:ID")``: its recipients stay queued,
held, neither sent nor expired (held time does not count against their
lifetime) — when, since it was armed,

* at least ``min_attempts`` recipients were attempted and the hard bounces
  (suspected filter bounces not among them) exceed ``max_hard_bounce_rate``
  of them, or the complaints exceed ``max_complaint_rate`` of the
  deliveries; or
* reputation / blocklist replies (``reputation_block``) came from at least
  ``block_providers`` providers, ``block_min_replies`` each.

An event record goes to :attr:`Guard.on_event` (the service routes it to
accounting and webhooks; ``fastmta send`` to its accounting file and
summary): ``{"status": "campaign_paused", "campaign", "reason", "figures",
"top_reasons", ...}``. ``fastmta queue resume campaign:ID`` continues it.

*Re-arming*: a resumed campaign starts a new count. It is paused again only
if the mail sent *after* the resume is bad on its own — another
``min_attempts`` attempts over the threshold (or complaints, or blocks, since
the resume) — so a resume is never undone by the figures that caused the
pause. :meth:`Guard.override` resumes a campaign and exempts it from the
brakes for the life of the process.

**Source rotation.** An egress source that draws reputation replies at a
provider (``source_min_blocks`` in the last hour, at least
``source_block_share`` of its outcomes there) is taken out of rotation for
that provider (never the last source left there): the dispatcher's
``source_filter`` steers new mail to the other sources, and what waited in
its ready queues there is routed again. After ``probe_after`` seconds one
transaction goes through it as a probe: delivered puts it back, another
reputation reply keeps it out for twice as long (up to ``probe_max``).

**Warm-up.** Hard bounces (after the filter watch's review) and complaints
that can be placed at a (source, site) are counted into that source's
warm-up day (:mod:`fastmta.delivery.warmup`), which advances on clean days
only.

State is in memory: a restarted process keeps the suspensions (the queue
control persists them) but counts anew.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

from fastmta.delivery.control import QueueControl
from fastmta.delivery.dispatch import Dispatcher
from fastmta.delivery.guard_config import GuardConfig
from fastmta.delivery.kpi import BLOCKED, COMPLAINTS, DELIVERED, FIGURES, HARD, SENT, Kpis, provider_of, rates
from fastmta.delivery.throttle import Throttles
from fastmta.queue.records import Outcome
from fastmta.queue.spool_errors import SpoolError

__all__ = ["Guard"]

log = logging.getLogger("fastmta.delivery.guard")

#: A probe with no verdict after this long (seconds) is sent again.
PROBE_TIMEOUT = 600.0
#: Distinct reasons remembered per campaign (the rest are counted under "other").
_REASONS_KEPT = 64
_ADDRESS = re.compile(r"<?[^\s<>@]+@[^\s<>]+>?")


class _Brake:
    """One campaign's counts since it was armed (its start, or its last resume)."""

    __slots__ = ("blocks", "counts", "paused", "pending", "reasons", "resumes")

    def __init__(self, resumes: int = 0) -> None:
        self.counts = [0] * len(FIGURES)
        self.blocks: Counter[str] = Counter()  # provider -> reputation replies
        self.reasons: Counter[tuple[str, str]] = Counter()  # (reply, category) -> count
        self.paused: float | None = None  # when the guard paused it
        self.pending = False  # the suspension is on its way (next loop iteration)
        self.resumes = resumes


class _Out:
    """An egress source out of rotation at a provider."""

    __slots__ = ("probe_at", "probe_sent", "since", "wait")

    def __init__(self, since: float, wait: float) -> None:
        self.since = since
        self.wait = wait
        self.probe_at = since + wait
        self.probe_sent: float | None = None


class Guard:
    """KPIs and brakes of one engine (``engine.guard``)."""

    def __init__(
        self,
        config: GuardConfig,
        *,
        control: QueueControl,
        dispatch: Dispatcher,
        throttles: Throttles,
        sources: Sequence[tuple[str, str | None]] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.control = control
        self.dispatch = dispatch
        self.throttles = throttles
        self.clock = clock
        #: Egress sources as (name, address); none configured: the dispatcher's one "default".
        self._names = [n for n, _ in sources] or ["default"]
        self._by_ip = {a: n for n, a in sources if a}
        self.kpis = Kpis(source_of=self.source_of, clock=clock)
        #: Called with every event record (campaign_paused, source_out_of_rotation, source_restored).
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=100)
        self._brakes: dict[str, _Brake] = {}
        self._exempt: set[str] = set()
        self._out: dict[tuple[str, str], _Out] = {}
        self._lonely: set[tuple[str, str]] = set()  # out-of-rotation candidates with no other source (warned)
        if config.enabled and config.source_rotation and len(self._names) > 1:
            dispatch.source_filter = self.source_allowed
        control.guard_summary = self.summary

    # --- feeding -------------------------------------------------------------------------

    def source_of(self, ip: str | None) -> str | None:
        """The egress source's name for an outcome's source IP (the only source when there is one)."""
        if len(self._names) == 1:
            return self._names[0]
        return self._by_ip.get(ip) if ip else None

    def on_outcome(self, outcome: Outcome) -> None:
        """Engine listener: count the outcome, then let the brakes look."""
        source = self.source_of(outcome.source_ip)
        figures = self.kpis.add_outcome(outcome, source)
        if not figures:
            return
        site = outcome.site if outcome.site is not None and not outcome.site.startswith("domain:") else None
        if HARD in figures and site is not None and source is not None:
            self._warmup(source, site, outcome.time, hard=1)
        if not self.config.enabled:
            return
        meta = outcome.meta
        job = meta.get("job") if meta else None
        if job is not None:
            brake = self._brake(str(job))
            if brake is not None and self._count(brake, figures, site, outcome, outcome.category):
                self._judge(str(job), brake)
        rotate = self._out or (BLOCKED in figures and self.config.source_rotation)
        if rotate and site is not None and source is not None:
            self._rotation(source, site, figures)

    def note_record(self, record: dict[str, Any]) -> None:
        """A record of what came back (complaint, unsubscribe, oob_bounce): the KPIs, then the campaign brake."""
        figures = self.kpis.note_record(record)
        if not figures:
            return
        site, source = record.get("site"), self.source_of(record.get("source_ip"))
        if COMPLAINTS in figures and isinstance(site, str) and source is not None:
            self._warmup(source, site, float(record.get("time") or self.clock()), complaints=1)
        campaign = record.get("campaign")
        if not self.config.enabled or not campaign:
            return
        brake = self._brake(str(campaign))
        if brake is not None and self._count(brake, figures, None, record, record.get("category")):
            self._judge(str(campaign), brake)

    def _warmup(self, source: str, site: str, at: float, *, hard: int = 0, complaints: int = 0) -> None:
        limits = self.throttles.sources.get(source)
        if limits is None or limits.warmup is None:
            return
        throttle = self.throttles.get(source, site, _loop_time(self.clock))
        if throttle.warmup is not None:
            throttle.warmup.record(at, hard=hard, complaints=complaints)

    # --- the campaign brake ------------------------------------------------------------

    def _brake(self, campaign: str) -> _Brake | None:
        """The campaign's brake, re-armed if an operator resumed it; None when it need not be judged."""
        if campaign in self._exempt:
            return None
        brake = self._brakes.get(campaign)
        if brake is None:
            brake = self._brakes[campaign] = _Brake()
            if len(self._brakes) > 10_000:  # a long-running service: forget campaigns long finished
                for key in [k for k, b in self._brakes.items() if b.paused is None][:1000]:
                    del self._brakes[key]
                self._brakes[campaign] = brake
        elif brake.paused is not None and not brake.pending and not self.control.is_suspended(f"campaign:{campaign}"):
            brake = self._brakes[campaign] = _Brake(brake.resumes + 1)  # resumed: count anew
            log.warning("campaign %s resumed: the guard counts anew (paused again only on new figures)", campaign)
        return brake

    def _count(
        self, brake: _Brake, figures: tuple[int, ...], site: str | None, what: Outcome | dict[str, Any],
        category: str | None,
    ) -> bool:
        """Count *figures* (of an outcome or a record); True when a brake may have to act on them."""
        counts = brake.counts
        for f in figures:
            counts[f] += 1
        bad = HARD in figures or BLOCKED in figures or COMPLAINTS in figures
        if BLOCKED in figures and site is not None:
            brake.blocks[provider_of(site)] += 1
        if bad and brake.paused is None:
            if isinstance(what, Outcome):
                reply = what.reply
                text = f"{reply.code} {reply.enhanced or ''} {_ADDRESS.sub('<>', reply.text)}"
            else:
                text = str(what.get("diagnostic") or what.get("status"))
            key = (" ".join(text.split())[:120], category or "")
            if key in brake.reasons or len(brake.reasons) < _REASONS_KEPT:
                brake.reasons[key] += 1
            else:
                brake.reasons[("other", "")] += 1
        return bad or (SENT in figures and counts[SENT] == self.config.min_attempts)

    def _judge(self, campaign: str, brake: _Brake) -> None:
        if brake.paused is not None:
            return
        cfg, c = self.config, brake.counts
        sent, delivered = c[SENT], c[DELIVERED]
        why = None
        if sent >= cfg.min_attempts and c[HARD] > cfg.max_hard_bounce_rate * sent:
            why = (f"hard-bounce rate {c[HARD] / sent:.1%} over {cfg.max_hard_bounce_rate:.1%} "
                   f"after {sent} attempts (suspected filter bounces not counted)")
        elif sent >= cfg.min_attempts and delivered and c[COMPLAINTS] > cfg.max_complaint_rate * delivered:
            why = f"complaint rate {c[COMPLAINTS] / delivered:.2%} over {cfg.max_complaint_rate:.2%} of deliveries"
        else:
            blocking = sorted(p for p, n in brake.blocks.items() if n >= cfg.block_min_replies)
            if len(blocking) >= cfg.block_providers:
                why = f"reputation / blocklist replies at {len(blocking)} providers: {', '.join(blocking)}"
        if why is not None:
            self._pause(campaign, brake, why)

    def _pause(self, campaign: str, brake: _Brake, why: str) -> None:
        now = self.clock()
        brake.paused, brake.pending = now, True
        key = f"campaign:{campaign}"
        figures: dict[str, Any] = dict(zip(FIGURES, brake.counts))
        figures.update(rates(figures))
        record = {
            "status": "campaign_paused", "time": round(now, 6), "campaign": campaign, "reason": why,
            "figures": figures, "blocked_providers": dict(brake.blocks.most_common()),
            "top_reasons": [{"reply": r, "category": c or None, "count": n}
                            for (r, c), n in brake.reasons.most_common(self.config.top_reasons)],
            "resumes": brake.resumes, "resume": f"fastmta queue resume {key}",
        }
        log.warning("guard: campaign %s paused: %s", campaign, why)
        _soon(lambda: self._suspend(brake, key, record))

    def _suspend(self, brake: _Brake, key: str, record: dict[str, Any]) -> None:
        brake.pending = False
        try:
            held = self.control.suspend(key)
        except (SpoolError, ValueError) as exc:
            log.error("guard: cannot suspend %s: %s", key, exc)
            record["error"] = str(exc)
        else:
            record["held"] = held["held"] + held["scheduled"]
        self._emit(record)

    def override(self, campaign: str) -> dict[str, Any]:
        """Resume *campaign* and let it go on whatever its figures (for the life of this process)."""
        self._exempt.add(campaign)
        self._brakes.pop(campaign, None)
        return self.control.resume(f"campaign:{campaign}")

    @property
    def paused(self) -> list[str]:
        """Campaigns the guard paused that are still suspended."""
        return [k for k, b in self._brakes.items()
                if b.paused is not None and self.control.is_suspended(f"campaign:{k}")]

    # --- source rotation -------------------------------------------------------------------

    def source_allowed(self, source: str, site: str) -> bool:
        """The dispatcher's source filter: may *source* take new mail for *site* now? True once per probe."""
        if not self._out:
            return True
        out = self._out.get((source, provider_of(site)))
        if out is None:
            return True
        now = self.clock()
        if out.probe_sent is not None and now - out.probe_sent < PROBE_TIMEOUT:
            return False  # the probe's verdict is awaited
        if now >= out.probe_at:
            out.probe_sent = now
            log.info("guard: probing %s at %s", source, provider_of(site))
            return True
        return False

    def _rotation(self, source: str, site: str, figures: tuple[int, ...]) -> None:
        provider = provider_of(site)
        key = (source, provider)
        now = self.clock()
        out = self._out.get(key)
        if out is not None:
            if out.probe_sent is None:
                return  # replies to what was in flight when it was taken out
            if DELIVERED in figures:
                del self._out[key]
                self._emit({"status": "source_restored", "time": round(now, 6), "source": source,
                            "provider": provider, "out_for": round(now - out.since, 3)})
            elif BLOCKED in figures:
                out.wait = min(out.wait * 2, self.config.probe_max)
                out.probe_at, out.probe_sent = now + out.wait, None
                log.warning("guard: probe of %s at %s refused again; next probe in %.0fs", source, provider, out.wait)
            return
        if BLOCKED not in figures:
            return
        series = self.kpis.sources.get(key)
        if series is None:
            return
        hour = series.window("1h", now)
        outcomes = sum(hour[f] for f in ("delivered", "hard", "suspected_filter", "soft", "deferred", "expired"))
        cfg = self.config
        if hour["blocked"] < cfg.source_min_blocks or hour["blocked"] < cfg.source_block_share * outcomes:
            return
        if not any(n != source and (n, provider) not in self._out for n in self._names):
            if key not in self._lonely:
                self._lonely.add(key)
                log.warning("guard: %s draws reputation replies at %s, but no other source is left there", source,
                            provider)
            return
        self._out[key] = _Out(now, cfg.probe_after)
        figures_now: dict[str, Any] = dict(hour)
        figures_now.update(rates(figures_now))
        self._emit({"status": "source_out_of_rotation", "time": round(now, 6), "source": source,
                    "provider": provider, "figures_1h": figures_now, "probe_at": round(now + cfg.probe_after, 3)})
        _soon(lambda: self.dispatch.reroute(source, lambda s: provider_of(s) == provider))

    # --- reporting -----------------------------------------------------------------------------

    def _emit(self, record: dict[str, Any]) -> None:
        self.events.append(record)
        if record["status"] != "campaign_paused":
            log.warning("guard: %s", record)
        if self.on_event is not None:
            try:
                self.on_event(record)
            except Exception:  # an event consumer must not break the delivery path
                log.exception("guard: event consumer failed")

    def summary(self) -> dict[str, Any]:
        """JSON-able, for ``fastmta queue summary``, ``send``'s summary and the admin API."""
        now = self.clock()
        return {
            "enabled": self.config.enabled,
            "paused": [{"campaign": k, "since": round(b.paused or 0.0, 3), "resumes": b.resumes}
                       for k, b in self._brakes.items()
                       if b.paused is not None and self.control.is_suspended(f"campaign:{k}")],
            "exempt": sorted(self._exempt),
            "sources_out": [{"source": s, "provider": p, "since": round(o.since, 3),
                             "probe_in": round(max(0.0, o.probe_at - now), 3), "probing": o.probe_sent is not None}
                            for (s, p), o in sorted(self._out.items())],
            "events": list(self.events)[-20:],
            "kpis": self.kpis.snapshot(now),
        }


def _loop_time(fallback: Callable[[], float]) -> float:
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return fallback()


def _soon(action: Callable[[], Any]) -> None:
    """Run *action* on the next loop iteration: not inside the delivery path that called a listener."""
    try:
        asyncio.get_running_loop().call_soon(action)
    except RuntimeError:  # no loop (a unit test): at once
        action()
