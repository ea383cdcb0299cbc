"""Dispatch: each recipient onto the ready queue of an (egress source, site), in batches.

The engine hands over recipients to send (newly accepted, due for a retry,
or resumed from the spool). They are routed by domain (cached DNS, static
routes), grouped by site, given an egress source (a weighted choice, steered
away from a source over its warm-up quota or out of rotation at the site's
provider: ``source_filter``, the reputation guard's), cut into batches of at most
``max_recipients_per_transaction`` and put on the :class:`SiteQueue` of that
(source, site), made on first use with the site's limits and throttle. What
happens to a batch after that (replies, retries, records) is the engine's.
A domain that cannot be routed is handed back as one failed attempt per
recipient (``on_unroutable``).
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import itertools
import logging
import random
import ssl
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any

from fastmta.delivery.batch import Batch, Delivery, HostHealth, SiteLimits, Source, lifetime_of, login_for
from fastmta.delivery.budget import ConnectionBudget, default_connection_limit
from fastmta.delivery.config import Config, SiteConfig
from fastmta.delivery.limits import limits_for
from fastmta.delivery.mta_sts import POLICY_FILE, is_verified_site, verifying_context
from fastmta.delivery.pool import Gate, ResultCallback, SiteQueue
from fastmta.delivery.routing import Route, RouteFailure, Router
from fastmta.delivery.source_config import DEFAULT_POOL, default_ehlo_name, source_pools
from fastmta.delivery.throttle import Throttles
from fastmta.errors import InputError
from fastmta.feedback.classify import Classifier
from fastmta.queue.records import RESERVED_META, Message, Recipient
from fastmta.smtp.connection import Timeouts
from fastmta.smtp.protocol import TLSPolicy
from fastmta.smtp.reply import Reply

log = logging.getLogger("fastmta.delivery.dispatch")

__all__ = ["Dispatcher", "Select", "Taken", "split_batches", "split_recipients"]

#: Picks recipients out of the queue: (message, recipient, its site when known) -> take it?
Select = Callable[[Message, Recipient, "str | None"], bool]
#: Recipients taken out: (message, recipient, its site when known)
Taken = list[tuple[Message, Recipient, "str | None"]]


class Dispatcher:
    """Routes recipients and queues them per (egress source, site). Owned by the engine.

    Works inside a running loop: :meth:`start` before the first :meth:`route`,
    :meth:`aclose` at the end (the site queues themselves are closed by their
    owner, who reaches them through :attr:`queues`).
    """

    def __init__(
        self,
        config: Config,
        *,
        router: Router | None,
        throttles: Throttles,
        classifier: Classifier,
        rng: random.Random,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        closing: Callable[[], bool],
        on_unroutable: Callable[[Message, list[Recipient], Reply, Delivery], None],
        on_result: ResultCallback,
        on_expired: Callable[[Batch, Reply | None], None],
        on_park: Callable[[int], None] | None = None,
    ) -> None:
        self.config = config
        self._router_given = router
        self._router: Router | None = router
        self.throttles = throttles
        self.classifier = classifier
        self._rng = rng
        # The owner's: its tasks are the ones it waits for (or cancels) at close.
        self._spawn = spawn
        self._closing = closing
        self._on_unroutable = on_unroutable
        self._on_result = on_result
        self._on_expired = on_expired
        self._on_park = on_park  # untried recipients parked at a held site (<0) or back (>0): SiteQueue.put
        # The machine's open-files limit bounds the cap: a configured one can only be lower.
        self.budget = ConnectionBudget(min(config.smtp.max_connections or 1 << 30, default_connection_limit()))
        self._sources = [Source(s.name, s.address, s.ehlo_name, s.weight) for s in config.sources] or [
            Source("default", None, default_ehlo_name())
        ]
        by_name = {s.name: s for s in self._sources}
        #: Egress pool -> its sources and their cumulative weights (PowerMTA's virtual-mta-pool).
        self._pools: dict[str, tuple[list[Source], list[int]]] = {}
        for pool, names in source_pools(config.sources).items():
            members = [by_name[n] for n in names]
            self._pools[pool] = (members, list(itertools.accumulate(m.weight for m in members)))
        self._pool_by_sender = {d.lower().rstrip("."): p for d, p in config.routing.pool_by_sender.items()}
        self._pools_gone: set[str] = set()  # pools named by queued mail that the configuration no longer has
        smtp = config.smtp
        self._timeouts = Timeouts(**{f: getattr(smtp.timeouts, f) for f in Timeouts.__dataclass_fields__})
        self._tls = TLSPolicy(smtp.tls)
        self._tls_context = _tls_context(smtp.tls_verify, smtp.tls_ca_file)
        # The one context that verifies (tls_verify's own, or made when first needed: MTA-STS sites, logins).
        self._verifying: ssl.SSLContext | None = self._tls_context if smtp.tls_verify else None
        self._unverifying: ssl.SSLContext | None = None  # a site's tls_verify = false under [smtp] tls_verify
        # [routing.auth]: the relays' logins, their sessions verifying the relay's certificate unless told not to.
        verified = any(a.tls_verify for a in config.routing.auth.values())
        self._credentials = config.routing.credentials(self._verified() if verified else None)
        self._health: HostHealth | None = None
        #: The ready queue of every (source name, site) sent to so far.
        self.queues: dict[tuple[str, str], SiteQueue] = {}
        self._limits_cache: dict[str, SiteLimits] = {}
        #: domain -> work waiting for its route (one lookup task per domain)
        self.lookups: dict[
            str, list[tuple[Message, dict[str, list[Recipient]], dict[str, Route | RouteFailure] | None]]
        ] = {}
        #: Given to every site queue (see SiteQueue.gate); set by the engine's queue control.
        self.gate: Gate | None = None
        #: May (source name, site) take new mail now? None: every source may. Set by the reputation
        #: guard (fastmta.delivery.brakes); True for a source out of rotation may spend its probe.
        self.source_filter: Callable[[str, str], bool] | None = None

    def start(self, state_dir: Path | None = None) -> None:
        """Bind to the running loop: make the router (unless one was given) and the host-health record.

        *state_dir* (a durable queue's directory) keeps what routing learns across restarts: the
        MTA-STS policies fetched.
        """
        if self._router is None:
            self._router = Router(self.config, rng=self._rng)
        if state_dir is not None and self._router.mta_sts is not None:
            self._router.mta_sts.keep_in(state_dir / POLICY_FILE)
        self._health = HostHealth(self.config.queue.host_down_time, asyncio.get_running_loop().time)

    async def aclose(self) -> None:
        """Close the router, if it is ours (a router given by the caller is the caller's to close)."""
        if self._router is not None and self._router_given is None:
            await self._router.aclose()

    def set_gate(self, gate: Gate | None) -> None:
        """Put *gate* in front of every site queue, those made later too (None: take it away)."""
        self.gate = gate
        for queue in self.queues.values():
            queue.gate = gate

    def cached_route(self, domain: str) -> Route | RouteFailure | None:
        """The route of *domain* if it is known now (no lookup)."""
        return self._router.route_cached(domain) if self._router is not None else None

    def take(self, select: Select) -> Taken:
        """Take what *select* picks out of every ready queue (sender holds too) and every wait for a
        route; what is in an open transaction stays. For an operator's bounce or delete."""
        taken: Taken = []
        for q in self.queues.values():
            q.unpark()
            q.ready = split_batches(q.ready, select, taken)
            q.sender_held = split_batches(q.sender_held, select, taken)
            q.repark()
        for entries in self.lookups.values():
            for msg, by_domain, _ in entries:
                for domain, group in list(by_domain.items()):
                    rest = split_recipients(msg, group, None, select, taken)
                    if not rest:
                        del by_domain[domain]
                    elif len(rest) < len(group):
                        by_domain[domain] = rest
            entries[:] = [e for e in entries if e[1]]  # the lookup's task takes its list, emptied or not
        return taken

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self._sources]

    def check_meta(self, meta: dict[str, Any] | None) -> None:
        """InputError unless what *meta* says of the delivery can be done (before a message is accepted):
        a pool some source is in, a ``max_lifetime`` that is a number of seconds."""
        if not meta:
            return
        for key in RESERVED_META.intersection(meta):
            raise InputError(f"meta.{key}: the accounting's own field (where and how the mail went), not a caller's")
        pool = meta.get("pool")
        if pool is not None and (not isinstance(pool, str) or pool not in self._pools):
            raise InputError(f"meta.pool: no source is in pool {pool!r} (pools: {', '.join(sorted(self._pools))})")
        try:
            lifetime_of(meta, 1.0, strict=True)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def _pool(self, msg: Message) -> tuple[list[Source], list[int]]:
        """The sources *msg* may go from: its meta's pool, else its sender domain's, else the default."""
        name = msg.meta.get("pool") if msg.meta else None
        if name is None and self._pool_by_sender:
            name = self._pool_by_sender.get(msg.sender.rpartition("@")[2].lower())
        pool = self._pools.get(name or DEFAULT_POOL)
        if pool is None:  # queued under a configuration that had the pool: sent, not stranded
            if name not in self._pools_gone:
                self._pools_gone.add(str(name))
                log.warning("queued mail names pool %r, which no source is in now: sent from the default pool", name)
            pool = self._pools[DEFAULT_POOL]
        return pool

    def _pick_source(self, pool: tuple[list[Source], list[int]]) -> Source:
        members, cum = pool
        if len(members) == 1:
            return members[0]
        return members[bisect.bisect_right(cum, self._rng.random() * cum[-1])]

    def route(self, msg: Message, rcpts: list[Recipient]) -> None:
        """Queue *rcpts* of *msg*: at once where the route is known, else after its lookup."""
        by_domain: dict[str, list[Recipient]] = {}
        for r in rcpts:
            by_domain.setdefault(r.domain, []).append(r)
        self._route_groups(msg, by_domain, None)

    def _route_groups(
        self, msg: Message, by_domain: dict[str, list[Recipient]], known: dict[str, Route | RouteFailure] | None
    ) -> None:
        """Queue the recipients now when every domain's route is known or cached.

        Otherwise wait for that domain's lookup. One lookup task per domain,
        however many messages wait for it: a burst of submits to a new domain
        costs one coroutine, not one per message (the router is single-flight
        too, but a task per message would still cost more than the delivery).
        """
        assert self._router is not None
        routes: list[Route | RouteFailure] = []
        for domain in by_domain:
            route = known.get(domain) if known else None
            if route is None:
                route = self._router.route_cached(domain)
            if route is None:
                waiting = self.lookups.get(domain)
                if waiting is None:
                    self.lookups[domain] = [(msg, by_domain, known)]
                    self._spawn(self._lookup(domain))
                else:
                    waiting.append((msg, by_domain, known))
                return
            routes.append(route)
        self._enqueue(msg, by_domain, routes)

    async def _lookup(self, domain: str) -> None:
        assert self._router is not None
        try:
            result = await self._router.route(domain)
        except Exception as exc:  # a resolver bug must not lose the recipients
            log.exception("routing %s failed", domain)
            result = RouteFailure(domain, Reply.local(451, "4.4.3", f"routing error: {exc}"), True, 0.0)
        for msg, by_domain, known in self.lookups.pop(domain, []):
            self._route_groups(msg, by_domain, {**(known or {}), domain: result})

    def _enqueue(self, msg: Message, by_domain: dict[str, list[Recipient]], routes: Sequence[Route | RouteFailure]) -> None:
        pool = self._pool(msg)
        source = self._pick_source(pool)
        by_site: dict[str, tuple[Route, list[Recipient]]] = {}
        for group, route in zip(by_domain.values(), routes):
            if isinstance(route, RouteFailure):
                self._on_unroutable(msg, group, route.reply, Delivery(f"domain:{route.domain}", None, None, None))
                continue
            entry = by_site.get(route.site)
            if entry is None:
                by_site[route.site] = (route, list(group))
            else:
                entry[1].extend(group)
        if self._closing():
            return
        for site, (route, group) in by_site.items():
            queue = self._queue_for(self._steer(self._warm_source(source, site, len(group), pool[0]), site, pool[0]), site)
            step = queue.limits.max_recipients_per_transaction
            for i in range(0, len(group), step):
                queue.put(Batch(msg, group[i : i + step], route, queue.source.name))

    def queue_stats(self, now: float) -> list[dict[str, Any]]:
        """Per (source, site): ready batches, open connections, most seen, transactions (``Engine.queue_stats``)."""
        out = []
        for (src, site), q in self.queues.items():
            status = q.throttle.status(now)
            out.append({
                "source": src, "site": site, "ready": len(q.ready) + len(q.parked), "connections": q.connections,
                "max_connections_seen": q.max_seen_connections, "connections_opened": q.connections_opened,
                "transactions": q.transactions, "window": status.window, "rate": status.rate,
                "suspended_for": max(0.0, status.suspended_until - now) if status.suspended_until else 0.0,
            })
        return out

    def _warm_source(self, source: Source, site: str, n: int, pool: list[Source]) -> Source:
        """*source*, unless it is warming up at *site*, over today's quota, and may overflow.

        Then the first other source of its *pool* that may send now (warm, or within its own
        quota) takes the mail; with none, it waits for *source*'s next quota.
        """
        if len(pool) == 1:
            return source
        now = asyncio.get_running_loop().time()
        decision = self.throttles.get(source.name, site, now).warmup_check(now, n)
        if decision is None or decision.allowed or not decision.overflow:
            return source
        for other in pool:
            if other is source:
                continue
            d = self.throttles.get(other.name, site, now).warmup_check(now, n)
            if d is None or d.allowed:
                return other
        return source

    def _steer(self, source: Source, site: str, pool: list[Source]) -> Source:
        """*source*, unless the source filter has it out of rotation at *site*: then another source of its
        *pool* it allows (a weighted random order, so at most one probe is spent); with none, *source* still."""
        allowed = self.source_filter
        if allowed is None or len(pool) == 1 or allowed(source.name, site):
            return source
        others = sorted((s for s in pool if s is not source),
                        key=lambda s: self._rng.random() ** (1.0 / s.weight), reverse=True)
        return next((s for s in others if allowed(s.name, site)), source)

    def reroute(self, source: str, sites: Callable[[str], bool]) -> int:
        """Route again what waits in the ready queues of *source* at the *sites* picked (it was taken out of
        rotation there): each message's recipients choose their source afresh. Returns how many moved."""
        moved: dict[int, tuple[Message, list[Recipient]]] = {}
        if self._closing():
            return 0
        for (src, site), q in self.queues.items():
            if src != source or not (q.ready or q.parked) or not sites(site):
                continue
            q.unpark()
            batches, q.ready = q.ready, deque()
            for b in batches:
                moved.setdefault(id(b.message), (b.message, []))[1].extend(b.recipients)
        for msg, rcpts in moved.values():
            self.route(msg, rcpts)
        return sum(len(r) for _, r in moved.values())

    def _queue_for(self, source: Source, site: str) -> SiteQueue:
        key = (source.name, site)
        queue = self.queues.get(key)
        if queue is None:
            assert self._health is not None
            now = asyncio.get_running_loop().time()
            tls, context = self._site_tls(site)
            if is_verified_site(site):  # an MTA-STS "enforce" domain: verified TLS or nothing
                tls, context = TLSPolicy.REQUIRED, self._verified()
            queue = SiteQueue(
                source, site, self._limits_for(site), throttle=self.throttles.get(source.name, site, now),
                classifier=self.classifier, timeouts=self._timeouts, health=self._health,
                on_result=self._on_result, on_expired=self._on_expired, tls=tls, tls_context=context,
                budget=self.budget,
            )
            queue.gate = self.gate
            queue.on_park = self._on_park
            queue.login = functools.partial(login_for, self._credentials)
            self.queues[key] = queue
        return queue

    def _site_tls(self, site: str) -> tuple[TLSPolicy, ssl.SSLContext]:
        """The TLS policy and context of *site*: its [sites] entry's tls / tls_verify, else [smtp]'s."""
        _, cfg = limits_for(site, self.config.sites, default=SiteConfig())
        if not isinstance(cfg, SiteConfig) or (cfg.tls is None and cfg.tls_verify is None):
            return self._tls, self._tls_context
        verify = self.config.smtp.tls_verify if cfg.tls_verify is None else cfg.tls_verify
        if cfg.tls_verify:  # asked for this site: Postfix's "verify" level, never in clear after a failed check
            return TLSPolicy(cfg.tls or "required"), self._verified()
        if verify:
            return TLSPolicy(cfg.tls) if cfg.tls else self._tls, self._verified()
        if self._unverifying is None:
            self._unverifying = self._tls_context if not self.config.smtp.tls_verify else _tls_context(False)
        return TLSPolicy(cfg.tls) if cfg.tls else self._tls, self._unverifying

    def _verified(self) -> ssl.SSLContext:
        if self._verifying is None:
            self._verifying = _tls_context(True, self.config.smtp.tls_ca_file)
        return self._verifying

    def _limits_for(self, site: str) -> SiteLimits:
        limits = self._limits_cache.get(site)
        if limits is None:
            _, cfg = limits_for(site, self.config.sites, default=SiteConfig())
            # Provider defaults are throttle limits only; the rest comes from SiteConfig's defaults.
            extra = cfg if isinstance(cfg, SiteConfig) else SiteConfig()
            limits = SiteLimits(
                cfg.max_connections, cfg.max_messages_per_connection,
                extra.max_recipients_per_transaction, extra.idle_timeout, extra.pipeline_depth,
            )
            self._limits_cache[site] = limits
        return limits


def split_batches(batches: Iterable[Batch], select: Select, taken: Taken) -> deque[Batch]:
    """*batches* without the recipients *select* picks (those are appended to *taken*)."""
    keep: deque[Batch] = deque()
    for b in batches:
        rest = split_recipients(b.message, b.recipients, b.route.site, select, taken)
        if len(rest) == len(b.recipients):
            keep.append(b)
        elif rest:
            keep.append(Batch(b.message, rest, b.route, b.source))
    return keep


def split_recipients(
    msg: Message, rcpts: list[Recipient], site: str | None, select: Select, taken: Taken
) -> list[Recipient]:
    """The recipients of *rcpts* that *select* does not pick; those it picks are appended to *taken*."""
    rest = []
    for r in rcpts:
        if select(msg, r, site):
            taken.append((msg, r, site))
        else:
            rest.append(r)
    return rest


def _tls_context(verify: bool, ca_file: str = "") -> ssl.SSLContext:
    """Opportunistic TLS between MTAs does not verify certificates by default
    (Postfix's ``may`` level): an unverified encrypted channel beats plain text,
    and most MX certificates would not match anyway.

    Not verifying, the context loads no trust store: loading the system's CA
    certificates (what ``create_default_context`` does) took 35-50 ms of every
    ``fastmta send``'s start-up, for certificates nobody would check. The
    protocol defaults (TLS 1.2 at least, secure ciphers) are the same: they
    come from ``SSLContext`` itself."""
    if verify:
        return verifying_context(ca_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
