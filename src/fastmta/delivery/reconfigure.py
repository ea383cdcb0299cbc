"""Apply a new configuration to a running engine (``fastmta serve``'s SIGHUP): what can change live.

Live, without dropping a connection or a message:

* ``[[dkim]]``: the signing keys; messages accepted from now on are signed
  with the new policy (those already queued keep the signature they have).
* ``[sites]``: throttle and connection limits. A site queue that is idle
  (no connection open, nothing waiting) is forgotten with its throttle,
  and made again with the new limits at its next message. A busy one is
  retuned in place (:func:`_retune`, :func:`retuned`): its
  throttle is not swapped (that would mix the tickets of two throttles'
  slow-start windows) but keeps its learned window and rate within the new
  bounds, and each connection takes the new per-connection limits (and the
  site's TLS policy) at its next session; the caps and rates a pattern's
  sites share (``provider_max_connections``, ``provider_rate``) change at once. An operator lowering Microsoft's connections in the middle
  of a campaign (the site busy from start to end) gets it at once; before,
  the old limits ran until the queue went idle, for a busy site never.

Everything else (sources, routing, DNS, queue and SMTP settings, the
classifier's rules) is wired into objects made at start and needs a
restart; :func:`reconfigure` names those sections instead of pretending.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING

import msgspec

from fastmta.delivery.batch import retuned
from fastmta.delivery.config import Config, SiteConfig
from fastmta.delivery.limits import ThrottleConfig, limits_for
from fastmta.delivery.mta_sts import is_verified_site
from fastmta.delivery.ratelimit import Gcra, parse_rate
from fastmta.delivery.throttle import EventKind, SiteThrottle

if TYPE_CHECKING:
    from fastmta.delivery.engine import Engine

log = logging.getLogger("fastmta.delivery.reconfigure")

__all__ = ["reconfigure"]

_RESTART_ONLY = ("dns", "routing", "sources", "queue", "smtp", "return_path", "classify")


def reconfigure(engine: Engine, new: Config) -> list[str]:
    """Apply *new* where it can be applied live; returns what changed (and what waits for a restart)."""
    old = engine.config
    changed: list[str] = []
    replace: dict[str, object] = {}
    if new.dkim != old.dkim:
        engine.dkim = new.dkim_policy()
        replace["dkim"] = new.dkim
        changed.append("dkim keys")
    if new.sites != old.sites:
        busy = _apply_sites(engine, old, new)
        replace["sites"] = new.sites
        changed.append("sites" + (f" (retuned while busy: {', '.join(busy)})" if busy else ""))
    waiting = [name for name in _RESTART_ONLY if getattr(new, name) != getattr(old, name)]
    if waiting:
        log.warning("reload: [%s] change(s) take effect at the next restart", "], [".join(waiting))
        changed.append("restart needed for: " + ", ".join(waiting))
    if replace:
        engine.config = msgspec.structs.replace(old, **replace)
    return changed


def _apply_sites(engine: Engine, old: Config, new: Config) -> list[str]:
    dispatch = engine._dispatch  # the engine's own parts: this module is its extension
    throttles = engine.throttles
    throttles.sites = dict(new.sites)
    dispatch.config = msgspec.structs.replace(dispatch.config, sites=new.sites)
    dispatch._limits_cache.clear()
    default = SiteConfig()
    busy: list[str] = []
    for (source, site), queue in list(dispatch.queues.items()):
        _, was = limits_for(site, old.sites, providers=throttles.providers, default=default)
        group, cfg = limits_for(site, new.sites, providers=throttles.providers, default=default)
        if was == cfg:
            continue
        throttles.provider.retune(source, group, cfg)  # the cap and rates the group's sites share
        if queue.connections or queue.ready or queue.busy:
            busy.append(site)
            limits = dispatch._limits_for(site)
            queue.limits, queue.configured = retuned(queue.configured, queue.limits, limits), limits
            queue.allowance = 2 * limits.max_connections * limits.pipeline_depth
            if not is_verified_site(site):  # an MTA-STS site keeps its verified TLS whatever [sites] says
                queue.tls, queue.tls_context = dispatch._site_tls(site)  # from its next connection
            throttle = throttles._throttles.get((source, site))
            if throttle is not None:
                _retune(throttle, cfg, asyncio.get_running_loop().time())
            continue
        del dispatch.queues[(source, site)]
        throttles._throttles.pop((source, site), None)
    return sorted(set(busy))


def _retune(throttle: SiteThrottle, config: ThrottleConfig, now: float) -> None:
    """New limits for the throttle of a busy site, applied in place (its internals: this module is the
    engine's extension, and throttle.py is at its size limit).

    The dials keep what they learned (the adaptive window and rate, a suspension, a held sender)
    within the new bounds: a lowered ``max_connections`` or ``max_rate`` holds from the next
    connection or message, a raised one is reached by the usual growth. Static rates (``rate``,
    ``connection_rate``) start afresh when they changed. Warm-up, provider procedures and hold rounds
    stay as they were made (a restart, or the site going idle, makes them anew).
    """
    old, throttle.config = throttle.config, config
    a = throttle.adaptive = config.adaptive
    w = throttle._window
    before = w.value
    w.ceiling = config.max_connections
    w.value = min(w.value, w.ceiling) if a.enabled else float(w.ceiling)
    w.good = min(w.good, w.ceiling)
    if w.value != before:
        throttle._emit(now, EventKind.WINDOW, before, w.value, "reload: new max_connections")
    r = throttle._rate
    before = r.value
    r.floor, r.ceiling = a.min_rate, a.max_rate if a.max_rate is not None else math.inf
    r.value = min(max(r.value, r.floor), r.ceiling)
    r.good = min(r.good, r.ceiling)
    if r.value != before:
        throttle._pacer.set_rate(r.value, now)
        if a.enabled:
            throttle._emit(now, EventKind.RATE, before, r.value, "reload: new rate limits")
    if config.rate != old.rate:
        throttle._static = [Gcra.from_spec(parse_rate(spec)) for spec in config.rate]
    if config.connection_rate != old.connection_rate:
        throttle._conn_rate = Gcra.from_spec(parse_rate(config.connection_rate)) if config.connection_rate else None
