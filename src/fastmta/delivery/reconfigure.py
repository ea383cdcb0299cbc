"""Apply a new configuration to a running engine (``fastmta serve``'s SIGHUP): what can change live.

Live, without dropping a connection or a message:

* ``[[dkim]]``: the signing keys; messages accepted from now on are signed
  with the new policy (those already queued keep the signature they have).
* ``[sites]``: throttle and connection limits. A site queue that is idle
  (no connection open, nothing waiting) is forgotten with its throttle,
  and made again with the new limits at its next message. A busy one keeps
  running on its old limits: swapping a throttle under open connections
  would mix the tickets of two throttles' slow-start windows, and a wrong
  window is worse than one more minute of the old one. It is reported, and
  a later reload (or a restart) applies it once the queue is idle.

Everything else (sources, routing, DNS, queue and SMTP settings, the
classifier's rules) is wired into objects made at start and needs a
restart; :func:`reconfigure` names those sections instead of pretending.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec

from fastmta.delivery.config import Config, SiteConfig
from fastmta.delivery.limits import limits_for

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
        changed.append("sites" + (f" (busy, on old limits until idle: {', '.join(busy)})" if busy else ""))
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
        _, now = limits_for(site, new.sites, providers=throttles.providers, default=default)
        if was == now:
            continue
        if queue.connections or queue.ready or queue.busy:
            busy.append(site)
            continue
        del dispatch.queues[(source, site)]
        throttles._throttles.pop((source, site), None)
    return sorted(set(busy))
