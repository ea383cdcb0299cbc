"""Queue control: what an operator asks of a running engine (``engine.control``; ``fastmta queue``).

``summary`` (PowerMTA's ``show queues``), ``show`` (one message), ``why`` (why
a recipient is not moving), ``suspend``/``resume`` (``pmta pause queue``,
``kcli suspend``), ``retry`` (``postqueue -i``), ``bounce`` and ``delete``
(``postsuper -d``); all return plain JSON-able dicts and lists. A target is
``site:NAME`` (a site, or one of its MX hosts), ``domain:NAME``,
``campaign:ID`` (the ``job`` meta key that campaign jobs and the HTTP
campaign API set), ``message:ID``, or a bare word: a queued message's id where
a message fits, else a site or a domain name.

Suspension: every batch put on a site's ready queue passes the *gate* (one
``is None`` test while nothing is suspended), which sets matching recipients
aside; what is ready at ``suspend`` is swept aside too; scheduled retries are
held when they fall due; a transaction in flight finishes. Held work is
neither sent nor expired: on release each message's deadline moves later by
the time since the later of the rule's start and its queuing (both survive a
restart, so does the credit; the whole message gains it). Rules persist in
``suspended.json`` beside the journal; held recipients stay unfinished there
and are held again when a restarted engine resumes them.

Bounce and delete make every matching unfinished recipient (ready, scheduled,
held, waiting for DNS) final through the engine's record path, one accounting
record each: bounced (``550 5.0.0 bounced by the operator: REASON``) or
deleted (status ``deleted``), category ``admin``, bounce type ``none`` (no
suppression: the address is not at fault). In-flight recipients are counted
and left alone. A recipient's last :data:`HISTORY_KEPT` failed attempts are
kept on ``Recipient.history`` (flat time/attempt pairs, the attempts interned;
empty until one fails), in memory only.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any, cast

from fastmta.delivery.batch import Batch, Delivery
from fastmta.delivery.dispatch import Dispatcher, Select, Taken, split_batches, split_recipients
from fastmta.delivery.ledger import Ledger
from fastmta.delivery.pool import SiteQueue
from fastmta.delivery.pool_view import describe_site_queue
from fastmta.delivery.routing import Route
from fastmta.delivery.suspensions import SUSPEND_FILE, Rule, load_rules, rule_key, save_rules
from fastmta.delivery.targets import parse_target
from fastmta.errors import Scope
from fastmta.feedback.classification import BounceType, Category, Classification
from fastmta.feedback.classification import Outcome as ReplyOutcome
from fastmta.queue.records import Message, Recipient, Status
from fastmta.queue.scheduler import DueQueue
from fastmta.queue.spool import Spool
from fastmta.smtp.reply import Reply

__all__ = ["AGE_EDGES", "HISTORY_KEPT", "SUSPEND_FILE", "QueueControl", "Rule", "parse_target"]

log = logging.getLogger("fastmta.delivery.control")

#: Upper bounds (seconds) of the age buckets of ``summary``'s ``ages`` (Postfix's qshape: 5, 10, 20 ... 1280
#: minutes, and older): unfinished recipients per bucket of time since their message was queued.
AGE_EDGES = tuple(60.0 * m for m in (5, 10, 20, 40, 80, 160, 320, 640, 1280))
#: Failed attempts remembered per recipient.
HISTORY_KEPT = 5
_INTERNED_MAX = 4096

Due = DueQueue[tuple[Message, list[Recipient]]]
Match = Select
#: Where an unfinished recipient is: (state, source, site, due time on the loop clock, rule or domain)
Where = tuple[str, "str | None", "str | None", "float | None", "str | None"]


class _Admin(StrEnum):
    # The classifier's categories describe replies; an operator's act is none of them.
    ADMIN = "admin"


def _one_line(reason: str) -> str:
    """An operator's reason as one printable line of at most 200 characters (it lands in replies and logs)."""
    return " ".join("".join(c if c.isprintable() else " " for c in reason).split())[:200]


def _site_has(site: str, value: str) -> bool:
    return site == value or value in site.split(",")


def _campaign(msg: Message) -> str | None:
    job = msg.meta.get("job") if msg.meta else None
    return None if job is None else str(job)


class QueueControl:
    """Inspect and act on the engine's queue. Made by the engine (``engine.control``)."""

    def __init__(
        self, *, dispatch: Dispatcher, ledger: Ledger, emit: Callable[..., None], spool: Spool | None,
        due: Callable[[], Due | None], unfinished: Callable[[], int], closing: Callable[[], bool],
    ) -> None:
        # The engine's parts; *emit* is Engine._emit (every state change goes on record through it).
        self._dispatch, self._ledger, self._emit, self._spool = dispatch, ledger, emit, spool
        self._due, self._unfinished, self._closing = due, unfinished, closing
        self._rules: dict[str, Rule] = {}
        self._sites: dict[str, str] = {}  # value -> rule key (site rules and bare words)
        self._domains: dict[str, str] = {}  # value -> rule key (domain rules and bare words)
        self._campaigns: dict[str, str] = {}
        self._site_hit: dict[str, str | None] = {}  # site -> rule key holding it (memo)
        self._held: dict[str, list[Batch]] = {}  # rule key -> batches it holds
        self._timers: dict[str, asyncio.TimerHandle] = {}  # rule key -> the end of a suspension for a time
        self._interned: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        #: Extra figures for the summary's total row (the reputation guard's KPIs and brakes), if set.
        self.guard_summary: Callable[[], dict[str, Any]] | None = None

    # --- life cycle and the engine's hooks ------------------------------------------

    def start(self) -> None:
        """Load the suspensions kept beside the spool (before the engine resumes its work)."""
        rules = load_rules(self._spool.directory) if self._spool is not None else []
        for rule in rules:
            self._rules[rule.key] = rule
            self._arm(rule)  # one whose time ran out while stopped ends at once
        self._reindex()
        if rules:
            log.warning("queue suspensions in force: %s", ", ".join(self._rules))

    def note(self, rcpt: Recipient, reply: Reply, phase: str, c: Classification, delivery: Delivery | None) -> None:
        """A failed attempt (the engine calls this once per failed recipient): keep it in the history."""
        key = (reply, phase, c, delivery.site if delivery else None, delivery.mx_host if delivery else None)
        attempt = self._interned.get(key)
        if attempt is None:
            if len(self._interned) >= _INTERNED_MAX:
                self._interned.clear()
            attempt = self._interned[key] = key
        h = rcpt.history
        if len(h) >= 2 * HISTORY_KEPT:
            h = h[2:]
        rcpt.history = (*h, time.time(), attempt)

    # --- the gate: holding work -----------------------------------------------------

    def _reindex(self) -> None:
        self._sites, self._domains, self._campaigns, self._site_hit = {}, {}, {}, {}
        for key, rule in self._rules.items():
            if rule.kind in ("site", "any"):
                self._sites[rule.value] = key
            if rule.kind in ("domain", "any"):
                self._domains[rule.value] = key
            if rule.kind == "campaign":
                self._campaigns[rule.value] = key
        self._dispatch.set_gate(self._gate if self._rules else None)

    def _site_rule(self, site: str) -> str | None:
        if not self._sites:
            return None
        try:
            return self._site_hit[site]
        except KeyError:
            hit = next((k for v, k in self._sites.items() if _site_has(site, v)), None)
            self._site_hit[site] = hit
            return hit

    def _gate(self, queue: SiteQueue, batch: Batch) -> Batch | None:
        key = self._site_rule(queue.site)
        if key is None and self._campaigns:
            job = _campaign(batch.message)
            key = self._campaigns.get(job) if job is not None else None
        if key is not None:
            self._held.setdefault(key, []).append(batch)
            return None
        if not self._domains:
            return batch
        rest: list[Recipient] = []
        held: dict[str, list[Recipient]] = {}
        for r in batch.recipients:
            k = self._domains.get(r.domain)
            rest.append(r) if k is None else held.setdefault(k, []).append(r)
        if not held:
            return batch
        for k, rcpts in held.items():
            self._held.setdefault(k, []).append(Batch(batch.message, rcpts, batch.route, batch.source))
        return Batch(batch.message, rest, batch.route, batch.source) if rest else None

    # --- suspend / resume -------------------------------------------------------------

    def suspend(self, target: str, *, duration: float | None = None, reason: str = "") -> dict[str, Any]:
        """Hold matching work until :meth:`resume`, or for *duration* seconds (``kcli suspend --duration``:
        a forgotten suspension held mail for ever); persists, with the operator's *reason*. Suspending a
        suspended target again with a duration or a reason replaces them. Returns what it holds now."""
        kind, value = parse_target(target)
        if kind == "message":
            raise ValueError("suspend takes site:NAME, domain:NAME, campaign:ID or a site or domain name")
        if duration is not None and not 0 < duration < 10 * 365 * 86400:
            raise ValueError(f"duration {duration!r}: a number of seconds above 0")
        why = _one_line(reason)
        now = time.time()
        old = self._rules.get(rule_key(kind, value))
        until = now + duration if duration else old.until if old else None  # a reason alone keeps the time
        rule = Rule(kind, value, old.since if old else now, until, why or (old.reason if old else ""))
        already = old is not None
        if not already or ((duration or why) and rule != old):
            self._save([*(r for r in self._rules.values() if r.key != rule.key), rule])  # durable first
            self._rules[rule.key] = rule
            self._arm(rule)
        if not already:
            self._reindex()
            for q in self._dispatch.queues.values():  # what is ready already goes aside too
                q.unpark()
                q.ready = self._pass(q, q.ready)
                q.sender_held = self._pass(q, q.sender_held)
                q.repark()
            log.warning("queue suspended: %s%s%s", rule.key, f" for {duration:g} s" if duration else "",
                        f" ({why})" if why else "")
        match = self._matcher(kind, value)
        return {
            "target": rule.key, "suspended": True, "already": already,
            "held": sum(len(b.recipients) for b in self._held.get(rule.key, ())),
            "scheduled": sum(1 for m, r, s in self._scheduled() if match(m, r, s)),
            "in_flight": self._in_flight(match), "rules": self.rules(),
        }

    def _pass(self, queue: SiteQueue, batches: deque[Batch]) -> deque[Batch]:
        return deque(kept for b in batches if (kept := self._gate(queue, b)) is not None)

    def resume(self, target: str) -> dict[str, Any]:
        """End a suspension (a bare word ends ``site:``/``domain:`` rules of that name too); its work goes on."""
        try:
            kind, value = parse_target(target)
        except ValueError:
            if not (isinstance(target, str) and target.strip() in self._rules):
                raise
            kind, value = "any", target.strip()  # a rule kept from before unknown kinds were refused
        keys = [k for k in ((value, f"site:{value}", f"domain:{value}") if kind == "any" else (f"{kind}:{value}",))
                if k in self._rules]
        if not keys:
            return {"target": target.strip(), "resumed": False, "released": 0, "rules": self.rules()}
        return self._end(keys)

    def _arm(self, rule: Rule) -> None:
        """A timer that ends *rule* at its ``until`` (replacing one set before)."""
        timer = self._timers.pop(rule.key, None)
        if timer is not None:
            timer.cancel()
        if rule.until is not None:
            delay = max(0.0, rule.until - time.time())
            self._timers[rule.key] = asyncio.get_running_loop().call_later(delay, self._expire, rule.key, rule.until)

    def _expire(self, key: str, until: float) -> None:
        rule = self._rules.get(key)
        if rule is not None and rule.until == until and not self._closing():  # else: the next start ends it
            log.warning("queue suspension ended (its time is up): %s", key)
            self._end([key])

    def _end(self, keys: list[str]) -> dict[str, Any]:
        ended = [self._rules[k] for k in keys]
        for k in keys:
            timer = self._timers.pop(k, None)
            if timer is not None:
                timer.cancel()
        self._save([r for k, r in self._rules.items() if k not in keys])
        for k in keys:
            del self._rules[k]
        self._reindex()  # before releasing: what the ended rules held must not be caught by them again
        now = time.time()
        released = 0
        credited: set[int] = set()
        for rule in ended:
            for b in self._held.pop(rule.key, []):
                msg = b.message
                if id(msg) not in credited:
                    credited.add(id(msg))
                    msg.deadline += max(0.0, now - max(rule.since, msg.queued_at))  # held time is not lifetime
                released += len(b.recipients)
                if not self._closing():
                    self._dispatch.route(msg, b.recipients)  # routed afresh: the hold may have been long
            log.warning("queue resumed: %s", rule.key)
        return {"target": ", ".join(keys), "resumed": True, "released": released, "rules": self.rules()}

    def is_suspended(self, key: str) -> bool:
        """Is the rule *key* (``campaign:ID``, ``site:NAME``...) in force?"""
        return key in self._rules

    def held_waiting(self) -> int:
        """Unfinished recipients that only a suspension keeps: held, or scheduled retries a rule will hold."""
        held = sum(len(b.recipients) for batches in self._held.values() for b in batches)
        if not self._rules:
            return held
        memo: dict[str, str | None] = {}
        return held + sum(1 for m, r, _ in self._scheduled() if self._rules_for(m, r, self._site_of(r, memo)))

    def rules(self) -> list[dict[str, Any]]:
        """The suspensions in force, with what each holds now."""
        return [{"rule": k, "kind": r.kind, "value": r.value, "since": round(r.since, 3),
                 "until": None if r.until is None else round(r.until, 3), "reason": r.reason,
                 "held": sum(len(b.recipients) for b in self._held.get(k, ()))} for k, r in self._rules.items()]

    def _save(self, rules: list[Rule]) -> None:
        if self._spool is not None:
            save_rules(self._spool.directory, rules)

    # --- retry / bounce / delete --------------------------------------------------

    def retry(self, target: str) -> dict[str, Any]:
        """Move matching scheduled work to now; for a site or domain, also end its host-down marks,
        reconnect pause and throttle suspension (the adaptive rate stays)."""
        kind, value = self._resolve(target, ("site", "domain", "campaign", "message", "any"))
        match = self._matcher(kind, value)
        moved = self._take_scheduled(match)
        groups: dict[int, tuple[Message, list[Recipient]]] = {}
        for msg, rcpt, _ in moved:
            groups.setdefault(id(msg), (msg, []))[1].append(rcpt)
        if not self._closing():
            for msg, rcpts in groups.values():
                self._dispatch.route(msg, rcpts)
        cleared = []
        if kind not in ("message", "campaign"):  # a campaign's sites are shared: their marks stay
            route = self._dispatch.cached_route(value) if kind != "site" else None
            sites = {route.site} if isinstance(route, Route) else set()
            for (src, site), q in self._dispatch.queues.items():
                if (kind != "domain" and _site_has(site, value)) or site in sites or any(
                        r.domain == value for b in q.waiting() for r in b.recipients):
                    q.retry_now()
                    cleared.append({"source": src, "site": site})
        return {"target": rule_key(kind, value), "retried": len(moved), "messages": len(groups), "cleared": cleared}

    def bounce(self, target: str, reason: str = "") -> dict[str, Any]:
        """Bounce every matching unfinished recipient now (not in flight): one record each."""
        why = _one_line(reason)
        reply = Reply.local(550, "5.0.0", f"bounced by the operator: {why}" if why else "bounced by the operator")
        return self._finish(target, Status.BOUNCED, reply, "bounced by the operator")

    def delete(self, target: str) -> dict[str, Any]:
        """Delete every matching unfinished recipient now (not in flight), unsent: status ``deleted``."""
        return self._finish(target, Status.DELETED, Reply.local(550, "5.0.0", "deleted by the operator"),
                            "deleted by the operator")

    def _finish(self, target: str, status: Status, reply: Reply, reason: str) -> dict[str, Any]:
        kind, value = self._resolve(target, ("site", "domain", "campaign", "message", "any"))
        match = self._matcher(kind, value)
        taken = self._take_scheduled(match) + self._dispatch.take(match)
        for key in list(self._held):
            self._held[key] = list(split_batches(self._held[key], match, taken))
        c = Classification(ReplyOutcome.PERMANENT, cast(Category, _Admin.ADMIN), BounceType.NONE, Scope.RECIPIENT,
                           rule="operator", reason=reason)
        messages: set[str] = set()
        done = 0
        for msg, rcpt, site in taken:  # everything taken out first: the records may run other callbacks
            if rcpt.status is not None and rcpt.status.is_final:
                continue
            messages.add(msg.id)
            done += 1
            self._emit(msg, rcpt, status, reply, Delivery(site, None, None, None) if site else None,
                       classification=c)
        if done:
            log.warning("queue %s: %d recipient(s) of %d message(s), target %s", status.value, done, len(messages),
                        rule_key(kind, value))
        return {"target": rule_key(kind, value), "status": status.value, "recipients": done,
                "messages": len(messages), "in_flight": self._in_flight(match)}

    def _resolve(self, target: str, kinds: tuple[str, ...]) -> tuple[str, str]:
        kind, value = parse_target(target)
        if kind == "any" and self._ledger.tracks(target.strip()):
            kind, value = "message", target.strip()
        if kind == "message" and not self._ledger.tracks(value):
            raise KeyError(f"message {value!r} is not in the queue (unknown, or every recipient final)")
        if kind not in kinds:
            raise ValueError(f"a {kind} target is not accepted here")
        return kind, value

    def _matcher(self, kind: str, value: str) -> Match:
        memo: dict[str, str | None] = {}
        if kind == "message":
            return lambda m, r, s: m.id == value
        if kind == "campaign":
            return lambda m, r, s: _campaign(m) == value
        if kind == "domain":
            return lambda m, r, s: r.domain == value

        def by_site(m: Message, r: Recipient, s: str | None) -> bool:
            if kind == "any" and r.domain == value:
                return True
            site = s if s is not None else self._site_of(r, memo)
            return site is not None and _site_has(site, value)
        return by_site

    def _site_of(self, r: Recipient, memo: dict[str, str | None]) -> str | None:
        """The site *r* goes to: its domain's route if known now, else the site of its last attempt."""
        if r.domain not in memo:
            route = self._dispatch.cached_route(r.domain)
            memo[r.domain] = route.site if isinstance(route, Route) else None
        site = memo[r.domain]
        if site is None and r.history:
            last = r.history[-1][3]
            site = last if last and not last.startswith("domain:") else None
        return site

    def _scheduled(self) -> Iterable[tuple[Message, Recipient, str | None]]:
        due = self._due()
        for _, (msg, rcpts) in due.entries() if due is not None else ():
            for r in rcpts:
                yield msg, r, None

    def _take_scheduled(self, match: Match) -> Taken:
        taken: Taken = []
        due = self._due()

        def keep(item: tuple[Message, list[Recipient]]) -> tuple[Message, list[Recipient]] | None:
            rest = split_recipients(item[0], item[1], None, match, taken)
            return item if len(rest) == len(item[1]) else (item[0], rest) if rest else None

        if due is not None:
            due.rebuild(keep)
        return taken

    def _in_flight(self, match: Match) -> int:
        return sum(1 for q in self._dispatch.queues.values() for b in q.sending.values() for r in b.recipients
                   if match(b.message, r, q.site))

    # --- inspection -------------------------------------------------------------------

    def summary(self) -> list[dict[str, Any]]:
        """One row (kind "site") per (egress source, site) with a queue or work; kind "domain" for retries
        whose site is not known now, "routing" for recipients waiting for their domain's route; last, kind
        "total": the sums, ``unfinished``, ``other`` (unfinished but in no row, e.g. verdicts the filter
        watch holds) and the suspensions. Retries are under source "*" when there are several sources
        (the source is chosen again when one falls due)."""
        loop = asyncio.get_running_loop()
        now, wall = loop.time(), time.time()
        rows: dict[tuple[str | None, str | None, str | None], dict[str, Any]] = {}
        oldest: dict[tuple[str | None, str | None, str | None], float] = {}

        def row(src: str | None, site: str | None, domain: str | None = None) -> dict[str, Any]:
            k = (src, site, domain)
            r = rows.get(k)
            if r is None:
                kind = "site" if site is not None else ("routing" if src is None else "domain")
                r = rows[k] = {"kind": kind, "source": src, "site": site, "domain": domain, "ready": 0,
                               "scheduled": 0, "in_flight": 0, "held": 0, "sender_held": 0, "routing": 0,
                               "connections": 0, "suspended": False, "suspended_by": [], "throttle": None,
                               "oldest_age": None, "top_reply": None, "ages": [0] * (len(AGE_EDGES) + 1)}
                rule = self._site_rule(site) if site is not None else None
                if rule is not None:
                    r["suspended"], r["suspended_by"] = True, [rule]
            return r

        replies: dict[tuple[str | None, str | None, str | None], Counter[str]] = {}

        def count(r: dict[str, Any], field: str, msg: Message, n: int, rcpts: Iterable[Recipient] = ()) -> None:
            r[field] += n
            r["ages"][bisect.bisect_right(AGE_EDGES, wall - msg.queued_at)] += n  # qshape's buckets
            k = (r["source"], r["site"], r["domain"])
            oldest[k] = min(oldest.get(k, msg.queued_at), msg.queued_at)
            for rcpt in rcpts:  # what the receivers said last, for the row's most common answer
                if rcpt.last_reply is not None:
                    replies.setdefault(k, Counter())[str(rcpt.last_reply)] += 1

        for (src, site), q in self._dispatch.queues.items():
            r = row(src, site)
            for field, batches in (("ready", q.waiting()), ("sender_held", q.sender_held),
                                   ("in_flight", q.sending.values())):
                for b in batches:
                    count(r, field, b.message, len(b.recipients), b.recipients if field != "in_flight" else ())
            r["connections"] = q.connections
            r["throttle"] = describe_site_queue(q, now, wall - now)
            if q.throttle.warmup is not None:  # the step, today's figures and why it holds
                r["throttle"]["warmup"] = {**(r["throttle"]["warmup"] or {}), **q.throttle.warmup.describe()}
        for key, held in self._held.items():
            for b in held:
                r = row(b.source, b.route.site)
                count(r, "held", b.message, len(b.recipients), b.recipients)
                if key not in r["suspended_by"]:
                    r["suspended_by"].append(key)
                r["suspended"] = True
        sources = self._dispatch.source_names
        src1 = sources[0] if len(sources) == 1 else "*"  # a retry chooses its source again when it falls due
        memo: dict[str, str | None] = {}
        for msg, rcpt, _ in self._scheduled():
            at = self._site_of(rcpt, memo)
            count(row(src1, at, None if at else rcpt.domain), "scheduled", msg, 1, (rcpt,))
        for domain, entries in self._dispatch.lookups.items():
            for msg, by_domain, _ in entries:
                count(row(None, None, domain), "routing", msg, sum(len(g) for g in by_domain.values()))
        out = sorted(rows.values(), key=lambda r: (r["kind"] != "site", r["site"] or "", r["domain"] or "",
                                                   r["source"] or ""))
        for r in out:
            k = (r["source"], r["site"], r["domain"])
            r["oldest_age"] = round(wall - oldest[k], 3) if k in oldest else None
            if k in replies:  # PowerMTA's "last error" of a queue: here the commonest, with how many had it
                reply, n = replies[k].most_common(1)[0]
                r["top_reply"] = {"reply": reply, "recipients": n}
        fields = ("ready", "scheduled", "in_flight", "held", "sender_held", "routing", "connections")
        total: dict[str, Any] = {"kind": "total", **{f: sum(r[f] for r in out) for f in fields}}
        total["oldest_age"] = max((r["oldest_age"] for r in out if r["oldest_age"] is not None), default=None)
        total["ages"] = [sum(col) for col in zip(*(r["ages"] for r in out))] if out else [0] * (len(AGE_EDGES) + 1)
        total["unfinished"] = self._unfinished()
        total["other"] = total["unfinished"] - sum(total[f] for f in fields if f != "connections")
        if self.guard_summary is not None:
            total["guard"] = self.guard_summary()
        return [*out, {**total, "suspensions": self.rules()}]

    def show(self, message_id: str) -> dict[str, Any]:
        """One message: envelope, meta, size, and each recipient's state. KeyError for an unknown id."""
        tracker = self._ledger._trackers.get(message_id)
        if tracker is None:
            future = self._ledger.result(message_id)  # KeyError: unknown (or finished long ago)
            return {"id": message_id, "final": True, "recipients": [o.as_record() for o in future.result()]}
        msg = tracker.message
        loop = asyncio.get_running_loop()
        now, wall = loop.time(), time.time()
        where = self._locate({id(msg)})
        return {
            "id": msg.id, "final": False, "sender": msg.sender, "queued_at": round(msg.queued_at, 3),
            "age": round(wall - msg.queued_at, 3), "expires_at": round(msg.deadline - now + wall, 3),
            "meta": msg.meta, "size": len(msg.body.raw),
            "recipients": [self._recipient(msg, r, where.get(id(r)), now, wall) for r in msg.recipients],
        }

    def why(self, target: str) -> dict[str, Any]:
        """Why a recipient (every queued message to that address) or a message is where it is."""
        text, trackers = target.strip(), self._ledger._trackers
        low = text.lower() if "@" in text else None
        if text in trackers:
            found = [(trackers[text].message, r) for r in trackers[text].message.recipients]
        else:  # every queued message to the address (a walk over the queue: an operator's question)
            found = [(t.message, r) for t in trackers.values() for r in t.message.recipients
                     if r.address.lower() == low]
        if not found:
            raise KeyError(f"no queued message for {text!r} (unknown, or every recipient final)")
        loop = asyncio.get_running_loop()
        now, wall = loop.time(), time.time()
        where = self._locate({id(m) for m, _ in found})
        memo: dict[str, str | None] = {}
        out = []
        for msg, rcpt in found:
            w = where.get(id(rcpt))
            entry = self._recipient(msg, rcpt, w, now, wall)
            entry["message_id"] = msg.id
            site = (w[2] if w is not None else None) or self._site_of(rcpt, memo)
            entry["site"] = site
            entry["throttles"] = [{"source": s, "site": q.site, **describe_site_queue(q, now, wall - now)}
                                  for (s, _), q in self._dispatch.queues.items() if site is not None and q.site == site]
            entry["suspended_by"] = self._rules_for(msg, rcpt, site)
            entry["reason"] = _explain(entry)
            out.append(entry)
        return {"target": text, "recipients": out}

    def _rules_for(self, msg: Message, rcpt: Recipient, site: str | None) -> list[str]:
        keys = [self._site_rule(site)] if site is not None else []
        keys += [self._domains.get(rcpt.domain), self._campaigns.get(_campaign(msg) or "")]
        return sorted({k for k in keys if k is not None})

    def _locate(self, wanted: set[int]) -> dict[int, Where]:
        """Where each unfinished recipient of the messages *wanted* (ids) is, by id() of the recipient."""
        found: dict[int, Where] = {}
        for (src, site), q in self._dispatch.queues.items():
            for state, batches in (("ready", q.waiting()), ("sender_held", q.sender_held),
                                   ("in_flight", q.sending.values())):
                for b in batches:
                    if id(b.message) in wanted:
                        found.update((id(r), (state, src, site, None, None)) for r in b.recipients)
        for key, held in self._held.items():
            for b in held:
                if id(b.message) in wanted:
                    found.update((id(r), ("held", b.source, b.route.site, None, key)) for r in b.recipients)
        due = self._due()
        for when, (msg, rcpts) in due.entries() if due is not None else ():
            if id(msg) in wanted:
                found.update((id(r), ("scheduled", None, None, when, None)) for r in rcpts)
        for domain, entries in self._dispatch.lookups.items():
            for msg, by_domain, _ in entries:
                if id(msg) in wanted:
                    found.update((id(r), ("routing", None, None, None, domain)) for g in by_domain.values() for r in g)
        return found

    def _recipient(self, msg: Message, r: Recipient, where: Where | None, now: float, wall: float) -> dict[str, Any]:
        final = r.status is not None and r.status.is_final
        state = "final" if final else (where[0] if where is not None else "pending")
        due = where[3] if where is not None else None
        return {
            "address": r.address, "index": r.index, "status": r.status.value if r.status else "queued",
            "state": state, "attempts": r.attempts, "source": where[1] if where else None,
            "site": where[2] if where else None, "held_by": where[4] if where and state == "held" else None,
            "waiting_for": where[4] if where and state == "routing" else None,
            "next_attempt": round(due - now + wall, 3) if due is not None else None,
            "last_reply": _reply(r.last_reply), "history": _history(r.history),
        }


# --- formatting ---------------------------------------------------------------------------


def _reply(reply: Reply | None) -> dict[str, Any] | None:
    return None if reply is None else {"code": reply.code, "enhanced": reply.enhanced, "text": str(reply)}


def _history(flat: tuple[Any, ...]) -> list[dict[str, Any]]:
    out = []
    for i in range(0, len(flat) - 1, 2):
        at, (reply, phase, c, site, mx) = flat[i], flat[i + 1]
        out.append({
            "time": round(at, 3), "reply": _reply(reply), "phase": phase, "site": site, "mx_host": mx,
            "category": c.category.value, "bounce_type": c.bounce.value, "outcome": c.outcome.value,
            "rule": c.rule or None, "reason": c.reason or None, "retry_after": c.retry_after,
            "site_paced": c.site_paced, "suspend_for": c.suspend_for,
        })
    return out


def _explain(e: dict[str, Any]) -> str:
    """One line for ``fastmta queue why``."""
    state, last, throttles = e["state"], e["last_reply"], e["throttles"]
    after = f" after {last['text']}" if last and last["code"] // 100 != 2 else ""
    simple = {
        "held": f"held by the operator ({e['held_by']}): not sent until resumed",
        "scheduled": f"scheduled: next attempt at {e['next_attempt']}{after}",
        "routing": f"waiting for the route of {e['waiting_for']} (DNS)",
        "in_flight": "in an open SMTP transaction", "final": f"final: {e['status']}",
        "pending": "pending: a verdict under review, or between states",
    }  # fmt: skip
    if state != "held" and e["suspended_by"]:
        return f"{state}; the operator suspended {', '.join(e['suspended_by'])}: held when it would be sent"
    if state in simple:
        return simple[state]
    for t in throttles:
        if t["suspended_for"]:
            ev = t["last_throttle"]
            return f"ready; the site is suspended for {t['suspended_for']}s" + (f": {ev['reason']}" if ev else "")
        if t["reconnect_in"] or t["hosts_down"]:
            return f"ready; the site refused connections: reconnecting in {t['reconnect_in']}s{after}"
    if state == "sender_held":
        return "ready; the site holds mail from this sender's domain (a provider procedure)"
    rate = throttles[0]["rate"] if throttles else None
    return f"ready: waiting for a connection or the site's pace{f' ({rate:.3g} msg/s)' if rate else ''}"
