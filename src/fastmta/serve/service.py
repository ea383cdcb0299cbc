"""The running service: one engine and its durable queue, with every way in and out around it.

:class:`Service` owns, for the life of the process:

* the :class:`~fastmta.delivery.engine.Engine` and its
  :class:`~fastmta.queue.spool.Spool` (``DATA_DIR/queue``) and accounting
  log (``DATA_DIR/accounting.jsonl``);
* the SMTP injection listeners (:mod:`fastmta.serve.smtp_listener`), the
  HTTP API (:mod:`fastmta.serve.http_api`), the admin API on a unix socket
  (:mod:`fastmta.serve.admin`) and the pickup watcher
  (:mod:`fastmta.serve.pickup`);
* the webhook outbox (:mod:`fastmta.serve.events`) and the metrics
  (:mod:`fastmta.serve.metrics`).

Every way in ends in :meth:`Service.inject`: recipients at the domains the
service receives for are taken in (written durably to ``DATA_DIR/inbound``
for the feedback processor); every other recipient goes to the engine,
which journals the message before :meth:`inject` returns. Readiness is the
condition for taking anything: the engine running, its record intact (no
journal or accounting failure) and enough free disk for the queue; while
not ready, SMTP answers 451 and HTTP 503, so nothing is accepted that
cannot be stored.

Signals (see :mod:`fastmta.cli.serve`): SIGHUP :meth:`reload` re-reads the
configuration (credentials, tokens, relay networks, receive domains, DKIM
keys, webhooks' settings) without closing a connection; SIGTERM
:meth:`stop` drains: listeners close first (clients in the middle of a
message get 421 and keep it), then transactions in flight finish, then the
queue is synced. What is left in it resumes at the next start.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from fastmta.delivery.accounting import AccountingLog
from fastmta.delivery.budget import default_connection_limit
from fastmta.delivery.config import Config as EngineConfig
from fastmta.delivery.engine import Engine, EngineClosed
from fastmta.delivery.reconfigure import reconfigure
from fastmta.errors import ConfigError, InputError
from fastmta.feedback.suppression_redis import RedisSuppressionStore
from fastmta.intake.items import SpoolItem
from fastmta.message.headers import with_missing_fields
from fastmta.message.returnpath import ReturnPath
from fastmta.message.unsubscribe import Unsubscribe
from fastmta.queue.journal_records import InputTake
from fastmta.queue.records import Outcome, new_message_id
from fastmta.queue.spool import Spool
from fastmta.queue.spool_errors import ProgressDamaged, SpoolError
from fastmta.serve.admin import build_admin_app
from fastmta.serve.api import INJECTION_PATHS, Unavailable
from fastmta.serve.auth import Accounts, RelayPolicy, TokenRing
from fastmta.serve.config import ServiceConfig, load_service_config
from fastmta.serve.events import EventOutbox
from fastmta.serve.events_redis import RedisStreamSink
from fastmta.serve.feedback_loop import FeedbackLoop
from fastmta.serve.gate import ConnectionGate
from fastmta.serve.http_api import build_api_app
from fastmta.serve.http_guard import HttpGuard
from fastmta.serve.inbound_store import publish_inbound, settle_inbound, stage_inbound
from fastmta.serve.meta_headers import MetaHeaders
from fastmta.serve.metrics import IntakeStats, ServiceMetrics
from fastmta.serve.notice_store import NoticeStore
from fastmta.serve.pickup import PickupWatcher
from fastmta.serve.sender_notices import SenderNotices
from fastmta.serve.smtp_listener import InjectServer
from fastmta.serve.unsubscribe import add_unsubscribe_routes
from fastmta.sink.config import ListenerConfig, SinkConfig

log = logging.getLogger("fastmta.serve")

__all__ = ["Service"]

#: Below this much free space in the data directory the service stops taking mail
#: (Postfix's queue_minfree): what it has accepted must still fit its state changes.
MIN_FREE_BYTES = 64 * 1024 * 1024


class Service:
    """``async with Service(config) as service: await service.wait()``."""

    def __init__(
        self, config: ServiceConfig, *, config_path: Path | None = None,
        campaign_check: Callable[[Path], str | None] | None = None, accept_lost_progress: bool = False,
    ) -> None:
        self.config = config
        #: Open a queue whose input progress is damaged beyond repair (Spool's accept_lost_progress).
        self.accept_lost_progress = accept_lost_progress
        self._outbound_room: int | None = None  # outbound connections the descriptors allow (at start)
        #: ``fastmta check`` on each campaign dropped in the pickup directory (given by the command line,
        #: which may import the checker: the service may not).
        self.campaign_check = campaign_check
        self.config_path = config_path
        serve = config.serve
        self.data_dir = Path(serve.data_dir)
        self.policy = RelayPolicy(serve.relay_networks, self._receive_domains(config))
        self.meta_headers = MetaHeaders(serve.meta_headers, strip=serve.strip_meta_headers)
        self.accounts = Accounts((u.name, u.password_hash) for u in serve.users)
        self.tokens = TokenRing((t.name, t.sha256) for t in serve.http.tokens)
        self.admin_tokens = TokenRing((t.name, t.sha256) for t in serve.admin.tokens)
        self.intake = IntakeStats()
        self.smtp_servers: list[InjectServer] = []
        self.smtp_addresses: list[tuple[str, int]] = []
        self.http_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.admin_socket: Path | None = None
        self.outbox: EventOutbox | None = None
        self.redis_events: RedisStreamSink | None = None
        self.pickup: PickupWatcher | None = None
        self.feedback: FeedbackLoop | None = None
        self.notices: SenderNotices | None = None
        #: RFC 8058 one-click and mailto: unsubscribe links ([unsubscribe]); None when not configured.
        self.unsubscribe = self._make_unsubscribe(config)
        self._rp = self._return_path_of(config)
        self._inbound_tasks: set[asyncio.Task[Any]] = set()
        self._engine: Engine | None = None
        self._spool: Spool | None = None
        self._accounting: AccountingLog | None = None
        self._metrics: ServiceMetrics | None = None
        self._runners: list[web.AppRunner] = []
        self._http_guard: HttpGuard | None = None
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopper: asyncio.Task[None] | None = None
        self._stopping = False
        self._free_checked = 0.0
        self._disk_ok = True
        self.started_at = 0.0

    @staticmethod
    def _receive_domains(config: ServiceConfig) -> list[str]:
        domains = list(config.serve.receive_domains)
        if config.engine.return_path.domain:
            domains.append(config.engine.return_path.domain)  # bounces come back to it
        if config.engine.unsubscribe.active and config.engine.unsubscribe.mailto_domain:
            domains.append(config.engine.unsubscribe.mailto_domain)  # mailto: unsubscribes come to it
        return domains

    @staticmethod
    def _make_unsubscribe(config: ServiceConfig) -> Unsubscribe | None:
        try:
            return config.engine.unsubscribe.build(config.engine.return_path.secret_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unsubscribe: {exc}") from None

    # ------------------------------------------------------------------ life

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("service not started")
        return self._engine

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _outbound_capped(self, engine: EngineConfig) -> EngineConfig:
        """*engine* with its outbound connections capped to leave the inbound ones their descriptors:
        the listeners' caps come out of what the open-files limit left free at start."""
        if self._outbound_room is None:
            serve = self.config.serve
            inbound = sum(listener.max_connections for listener in serve.smtp) + serve.http.max_connections
            free = default_connection_limit()  # (the listeners' caps are maxima: half of it at least)
            self._outbound_room = max(1, free // 2, free - inbound)
        room = self._outbound_room
        smtp = msgspec.structs.replace(engine.smtp, max_connections=min(engine.smtp.max_connections or room, room))
        return msgspec.structs.replace(engine, smtp=smtp)

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.data_dir / "inbound").mkdir(exist_ok=True, mode=0o700)
        await asyncio.to_thread(settle_inbound, self.data_dir / "inbound")
        try:
            self._spool = await asyncio.to_thread(functools.partial(
                Spool, self.data_dir / "queue", accept_lost_progress=self.accept_lost_progress,
            ))
        except SpoolError as exc:  # not the configuration's fault: the command says "cannot start"
            hint = " [--accept-lost-progress]" if isinstance(exc, ProgressDamaged) else ""
            raise type(exc)(f"cannot open the queue in {self.data_dir / 'queue'}: {exc}{hint}") from None
        if self._spool.report.damaged:
            log.error("queue recovery: %s", self._spool.report)
        self._accounting = AccountingLog(self.data_dir / "accounting.jsonl")
        engine = Engine(self._outbound_capped(self.config.engine), accounting=self._accounting, spool=self._spool)
        self._engine = engine
        try:
            await self._start_engine(engine)
            await self._start_smtp()
            await self._start_http()
            await self._start_admin()
            self._start_pickup()
        except BaseException:
            await self.stop()  # what started is stopped: the queue closed, the accounting flushed
            raise
        log.info(
            "fastmta serve ready: smtp %s, http %s, admin %s",
            ", ".join(f"{h}:{p}" for h, p in self.smtp_addresses) or "-",
            f"{self.http_address[0]}:{self.http_address[1]}" if self.http_address else "-",
            self.admin_socket or "-",
        )

    async def _start_engine(self, engine: Engine) -> None:
        """The engine, and what listens to its outcomes; what a crash left owed goes out."""
        serve = self.config.serve
        assert self._spool is not None
        # What must see every outcome, and store it before the journal does (a kill -9 then loses
        # none), is in place before the engine starts: recovered mail may bounce while the rest starts.
        if serve.webhooks:
            self.outbox = EventOutbox(self.data_dir / "events", list(serve.webhooks))
            await self.outbox.start()
            engine.add_listener(self.outbox.on_outcome)
            self._spool.before_commit.append(self.outbox.before_journal)  # events stored before their outcomes
        if serve.dsn:
            self.notices = SenderNotices(
                engine, hostname=serve.hostname, policy=self.policy, store=None,
                delay_warning_time=serve.delay_warning_time, per_sender=serve.dsn_per_sender,
                owed=NoticeStore(self.data_dir / "notices"),
            )
            engine.add_listener(self.notices.on_outcome)
            self._spool.before_commit.append(self.notices.before_journal)  # owed notices stored before their bounces
            self.notices.load_owed(self._spool.recovered_ids())
        # Suppressions from hard bounces: the feedback loop starts later; what comes before waits for it.
        early: list[Outcome] | None = []  # None once the loop has them all

        def to_feedback(outcome: Outcome) -> None:
            if early is not None:
                early.append(outcome)
            elif self.feedback is not None:
                self.feedback.on_outcome(outcome)

        engine.add_listener(to_feedback)
        await engine.start()
        if engine.recovered:
            log.info("resumed %d unfinished recipient(s) from the queue", engine.recovered)
        cluster = self.config.engine.cluster
        if cluster.active:
            # Cluster: every accounting record also goes to a Redis Stream (consumer groups read it).
            self.redis_events = RedisStreamSink(cluster.redis, key=cluster.prefix + "events")
            await self.redis_events.start()
            engine.add_listener(self.redis_events.on_outcome)
        shared = None
        if cluster.active and cluster.suppression:  # one list for the cluster, a copy on each node
            shared = RedisSuppressionStore(self.data_dir / "suppression.db", cluster.redis, prefix=cluster.prefix,
                                           timeout=cluster.timeout, retry=cluster.retry)
            shared.start()
            if not await asyncio.to_thread(shared.wait_synced, 120.0):  # not long if Redis does not answer
                log.warning("suppressions: Redis unreachable; checking against this node's copy until it is back")
        self.feedback = FeedbackLoop(
            self.data_dir, return_path=self._return_path(), classifier=engine.classifier, emit=self._emit_record,
            unsubscribe=self.unsubscribe.from_mail if self.unsubscribe is not None else None, store=shared,
            keep_unrecognized=(serve.keep_unrecognized_days * 86400, serve.keep_unrecognized_bytes),
        )
        await self.feedback.start()
        # Campaign pauses, sources out of rotation: on record and to the webhooks like any outcome.
        engine.guard.on_event = self._emit_record
        engine.set_suppression(self.feedback.store)  # every way in is checked against the list
        waited, early = early or [], None
        for outcome in waited:  # outcomes of recovered mail while the loop started
            self.feedback.on_outcome(outcome)
        if self.notices is not None:
            self.notices.store = self.feedback.store  # no notice to a suppressed sender
            self.notices.resume()  # what a crash left owed
        self._metrics = ServiceMetrics(engine, intake=self.intake, spool=self._spool, outbox=self.outbox)
        self.started_at = time.time()

    async def _start_smtp(self) -> None:
        serve = self.config.serve
        for lc in serve.smtp:
            host, port = lc.address
            sink_config = SinkConfig(
                listeners=(ListenerConfig(host, port, hostname=serve.hostname),),
                max_message_size=lc.max_message_size, max_recipients=lc.max_recipients,
                tls_cert=Path(lc.tls_cert) if lc.tls_cert else None, tls_key=Path(lc.tls_key) if lc.tls_key else None,
            )
            server = InjectServer(
                sink_config, service=self, policy=self.policy, accounts=self.accounts, hostname=serve.hostname,
                max_auth_failures=serve.max_auth_failures, memory_budget=serve.receiving_memory,
                gate=ConnectionGate(lc.max_connections, lc.max_connections_per_ip, on_refused=self._refused_smtp),
            )
            self.smtp_addresses.extend(await server.start())
            self.smtp_servers.append(server)

    async def _start_http(self) -> None:
        address = self.config.serve.http.address
        if address is None:
            return
        app = build_api_app(self, max_request_size=self.config.serve.http.max_request_size)
        if self.unsubscribe is not None and self.feedback is not None:
            # Public, no token: the signed token in the URL is the authorization (RFC 8058).
            add_unsubscribe_routes(app, self.unsubscribe, self.feedback.record_unsubscribe)
        http = self.config.serve.http
        guard = HttpGuard(
            max_connections=http.max_connections, idle_timeout=http.idle_timeout, min_body_rate=http.min_body_rate,
            on_refused=lambda reason: self.intake.refused_connection("http", reason),
        )
        app.middlewares.insert(0, guard.middleware)  # outermost: a handler's whole run counts as busy
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        self._http_guard = guard
        self.http_address = await guard.start(runner, address[0], address[1])

    async def _start_admin(self) -> None:
        admin = self.config.serve.admin
        path = Path(admin.socket) if admin.socket else self.data_dir / "admin.sock"
        if len(os.fsencode(path)) > 100:
            raise ConfigError(f"serve.admin.socket: path too long for a unix socket ({path}); set a shorter one")
        runner = web.AppRunner(build_admin_app(self, require_token=False), access_log=None)
        await runner.setup()
        self._runners.append(runner)
        if path.exists() and stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # left by a previous run (the queue lock already ensures only one service runs)
        old = os.umask(0o177)  # the socket is the operator's alone: created 0600, no window
        try:
            await web.UnixSite(runner, str(path)).start()
        finally:
            os.umask(old)
        self.admin_socket = path
        if admin.listen:
            token_runner = web.AppRunner(build_admin_app(self, require_token=True), access_log=None)
            await token_runner.setup()
            self._runners.append(token_runner)
            host, port = admin.listen.rsplit(":", 1)
            await web.TCPSite(token_runner, host.strip("[]"), int(port), reuse_address=False).start()
            self.admin_address = _bound(token_runner)

    def _start_pickup(self) -> None:
        pickup = self.config.serve.pickup
        if not pickup.directory:
            return
        directory = Path(pickup.directory)
        directory.mkdir(parents=True, exist_ok=True)
        assert self._spool is not None
        self.pickup = PickupWatcher(
            directory, self._spool, self._submit_item, interval=pickup.interval, settle=pickup.settle,
            delete=pickup.delete, return_path=self._return_path(), unsubscribe=self.unsubscribe,
            rejects=self.data_dir / "rejects.jsonl",
            on_reject=lambda _r: self.intake.rejected("pickup"), on_record=self._emit_record,
            check=self.campaign_check if pickup.check else None,
        )
        self._tasks.append(asyncio.ensure_future(self.pickup.run(self._stop)))

    def _return_path(self) -> ReturnPath | None:
        return self._rp

    @staticmethod
    def _return_path_of(config: ServiceConfig) -> ReturnPath | None:
        rp = config.engine.return_path
        if not rp.domain:
            return None
        try:
            return ReturnPath(Path(rp.secret_file).read_bytes().strip(), rp.domain, rp.prefix)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"return_path: {exc}") from None

    async def wait(self) -> None:
        """Until :meth:`stop` has finished."""
        await self._stopped.wait()

    async def stop(self, timeout: float | None = None) -> None:
        """Drain and stop: listeners first, then what is in flight, then the queue is synced."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._stop.set()
        timeout = self.config.serve.drain_timeout if timeout is None else timeout
        if self._engine is not None:
            # First: clients' submits waiting for room are refused now (451 / 503); new ones are refused
            # by ready(). Else room freed while draining accepted a message whose client the listener's
            # close had already told 421, and it went out twice when the client retried.
            self._engine.refuse_waiting("the service is shutting down")
        for server in self.smtp_servers:
            await server.close()  # 421 to connected clients; a message not yet answered 250 stays theirs
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, timeout)
            except (TimeoutError, asyncio.CancelledError):
                pass
            except Exception:
                log.exception("a service task failed while stopping")
        if self._http_guard is not None:
            self._http_guard.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        if self.notices is not None:
            await self.notices.flush_all()  # gathered for a second: queued now, before the queue closes
        if self._engine is not None:
            await self._engine.close(timeout)
        if self._inbound_tasks:
            await asyncio.wait(set(self._inbound_tasks), timeout=timeout)
        if self.feedback is not None:
            await self.feedback.close()
        if self.outbox is not None:
            await self.outbox.close(timeout=min(timeout, 10.0))
        if self.redis_events is not None:
            await self.redis_events.close()
        if self._accounting is not None:
            self._accounting.close()
        if self._spool is not None:
            await self._spool.close()
        if self.notices is not None and self.notices.owed is not None:
            self.notices.owed.close()  # after the spool's last batch, which may still owe notices
        if self.admin_socket is not None:
            try:
                self.admin_socket.unlink()
            except OSError:
                pass
        self._stopped.set()

    def request_stop(self) -> None:
        """From a signal handler: start :meth:`stop` (once)."""
        if not self._stopping:
            self._stopper = asyncio.ensure_future(self.stop())

    # ---------------------------------------------------------------- reload

    def reload(self) -> list[str]:
        """Re-read the configuration file and apply what can change while running; returns what changed.

        Applied live: SMTP accounts, API and admin tokens, relay networks,
        receive domains, the DKIM signing keys. Anything else (listeners,
        data directory, engine limits) needs a restart and is reported as such.
        A configuration that does not load changes nothing.
        """
        if self.config_path is None:
            return []
        try:
            new = load_service_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, configuration unchanged: %s", exc)
            raise
        changed: list[str] = []
        old = self.config
        if new.serve.users != old.serve.users:
            self.accounts = Accounts((u.name, u.password_hash) for u in new.serve.users)
            changed.append("users")
        if new.serve.http.tokens != old.serve.http.tokens:
            self.tokens = TokenRing((t.name, t.sha256) for t in new.serve.http.tokens)
            changed.append("http tokens")
        if new.serve.admin.tokens != old.serve.admin.tokens:
            self.admin_tokens = TokenRing((t.name, t.sha256) for t in new.serve.admin.tokens)
            changed.append("admin tokens")
        receive = self._receive_domains(new)
        if (new.serve.meta_headers, new.serve.strip_meta_headers) != (old.serve.meta_headers, old.serve.strip_meta_headers):
            self.meta_headers = MetaHeaders(new.serve.meta_headers, strip=new.serve.strip_meta_headers)
            changed.append("meta headers")
        if new.serve.relay_networks != old.serve.relay_networks or receive != self._receive_domains(old):
            self.policy = RelayPolicy(new.serve.relay_networks, receive)
            changed.append("relay networks / receive domains")
        for server in self.smtp_servers:
            server.policy, server.accounts = self.policy, self.accounts
        if self.notices is not None:
            self.notices.policy = self.policy
        if self._engine is not None:
            changed.extend(reconfigure(self._engine, self._outbound_capped(new.engine)))
        restart = [
            key for key in ("smtp", "http", "data_dir", "pickup", "webhooks", "hostname")
            if getattr(new.serve, key) != getattr(old.serve, key)
        ]
        if restart:
            log.warning("reload: changes to serve.%s take effect at the next restart", ", serve.".join(restart))
        self.config = ServiceConfig(new.engine, msgspec_replace_keep(old.serve, new.serve, restart), new.source)
        log.info("configuration reloaded: %s", ", ".join(changed) or "nothing changed")
        return changed

    # ------------------------------------------------------------ the way in

    def ready(self) -> tuple[bool, str]:
        if self._engine is None or self._stopping:
            return False, "shutting down" if self._stopping else "starting"
        fatal = self._engine.fatal
        if fatal is not None:
            return False, f"the delivery record cannot be kept: {fatal}"
        now = time.monotonic()
        if now - self._free_checked > 1.0:
            self._free_checked = now
            try:
                self._disk_ok = shutil.disk_usage(self.data_dir).free >= MIN_FREE_BYTES
            except OSError:
                self._disk_ok = False
        if not self._disk_ok:
            return False, f"less than {MIN_FREE_BYTES // 2**20} MiB free in {self.data_dir}"
        return True, ""

    async def inject(
        self, content: bytes, sender: str, recipients: list[str], *, via: str, meta: dict[str, Any] | None = None
    ) -> str:
        return await self._inject(content, sender, recipients, via, meta, None, self.config.serve.max_queue_wait)

    async def _submit_item(self, item: SpoolItem, take: InputTake | None) -> str:
        # No client waits on the pickup directory: its files wait for room as long as it takes.
        return await self._inject(item.content, item.sender, item.recipients, "pickup", item.meta, take, None)

    async def _inject(
        self, content: bytes, sender: str, recipients: list[str], via: str, meta: dict[str, Any] | None,
        take: InputTake | None, room_timeout: float | None,
    ) -> str:
        assert via in INJECTION_PATHS, via
        ready, why = self.ready()
        if not ready:
            self.intake.rejected(via, "unavailable")
            raise Unavailable(why)
        inbound = [r for r in recipients if self.policy.receive_domains and self.policy.receives(_domain(r))]
        outbound = [r for r in recipients if r not in inbound] if inbound else recipients
        meta = {**(meta or {}), "via": via}  # how it came in is the service's to say, never the caller's
        message_id = new_message_id()
        staged: Path | None = None
        try:
            # Both parts or neither: the mail for the receive domains is written first but not yet where
            # it is read, then the relayed part is queued (it is what may be refused: bad input, a full
            # queue), then the first is put in place. Queued first and written second, a failed write
            # answered 451 to a message already queued: every retry of the client delivered it again;
            # written in place first, a refused message left it behind, read again at the retry.
            if inbound:
                staged = await asyncio.to_thread(stage_inbound, self.data_dir / "inbound", message_id, content,
                                                 sender, inbound)
            if outbound:
                # [serve] meta_headers: X-Job and the like (HTTP callers say it in the request); InputError: a
                # header that is not a tag. The mail kept for the receive domains stays as it came.
                relayed, tags = self.meta_headers.take(content) if via in ("smtp", "pickup") else (content, {})
                if via in ("smtp", "http"):  # (a pickup file got them when it was read)
                    relayed = with_missing_fields(relayed, sender.rpartition("@")[2] or self.config.serve.hostname)
                await self.engine.submit(relayed, sender, outbound, meta={**tags, **meta}, message_id=message_id,
                                         take=take, room_timeout=room_timeout)
        except BaseException as exc:
            if staged is not None:
                if isinstance(exc, (InputError, EngineClosed)):  # refused: nothing of it may stay
                    staged.unlink(missing_ok=True)
                else:
                    # Cancelled (the client left, the service stops) or a fault, maybe after the queue took the
                    # relayed part: the other goes in place too, at worst read twice, never lost.
                    self._publish_now(staged)
            if isinstance(exc, InputError):
                self.intake.rejected(via)
            elif isinstance(exc, EngineClosed):  # a full queue (QueueFull) or shutting down
                self.intake.rejected(via, "unavailable")
                raise Unavailable(str(exc)) from None
            raise
        if staged is not None:
            await self._publish_inbound(staged)
        self.intake.accepted(via, len(recipients))
        return message_id

    async def _publish_inbound(self, staged: Path) -> None:
        """*staged* put where the feedback processor reads it, and read (in the background)."""
        self._read_inbound(await asyncio.to_thread(publish_inbound, staged))

    def _publish_now(self, staged: Path) -> None:
        """The same, from where nothing may be awaited (a cancellation): a rename and an fsync."""
        self._read_inbound(publish_inbound(staged))

    def _read_inbound(self, path: Path | None) -> None:
        if path is not None and self.feedback is not None:
            task = asyncio.ensure_future(self.feedback.process(path))
            self._inbound_tasks.add(task)
            task.add_done_callback(self._inbound_tasks.discard)

    def _emit_record(self, record: dict[str, Any]) -> None:
        """A record of what came back (oob_bounce, complaint, unsubscribe...): accounting and webhooks."""
        if self._engine is not None:
            self._engine.guard.note_record(record)  # complaints and unsubscribes count in the reputation KPIs
        if self._accounting is not None:
            self._accounting.write_record(record)
        if self.outbox is not None:
            self.outbox.put(record)
        if self.redis_events is not None:
            self.redis_events.put(record)

    # ------------------------------------------------------------- front ends

    def campaign_message(self, campaign: str, recipient: str, sender: str, message: bytes) -> tuple[str, bytes]:
        head_end = message.find(b"\r\n\r\n")
        head = message[: head_end if head_end >= 0 else len(message)].lower()
        extra = b""
        if self._rp is not None:
            if b"\nfeedback-id:" not in b"\n" + head:  # Gmail's: campaign:customer:type:sender (the last it keys on)
                fields = [re.sub(r"[^A-Za-z0-9._-]", "-", x)[:60] for x in (campaign, "fastmta", "bulk",
                                                                          sender.rpartition("@")[2])]
                extra += f"Feedback-ID: {':'.join(fields)}\r\n".encode("ascii")
            sender = self._rp.address(campaign, recipient)
            extra = self._rp.trace_header(campaign, recipient) + extra
        if self.unsubscribe is not None and b"\nlist-unsubscribe:" not in b"\n" + head:
            try:
                extra += self.unsubscribe.headers(campaign, recipient)
            except ValueError as exc:
                raise InputError(f"unsubscribe headers: {exc}") from None
        return sender, extra + message

    def _refused_smtp(self, reason: str) -> None:
        self.intake.refused_connection("smtp", reason)

    def refused(self, via: str, reason: str) -> None:
        self.intake.rejected(via, reason)

    def http_principal(self, token: str) -> str | None:
        return self.tokens.principal(token)

    def admin_principal(self, token: str) -> str | None:
        return self.admin_tokens.principal(token)

    def render_metrics(self) -> tuple[bytes, str]:
        if self._metrics is None:
            raise Unavailable("starting")
        return self._metrics.render()


def msgspec_replace_keep(old: Any, new: Any, keep: list[str]) -> Any:
    """*new*, with the fields named in *keep* taken from *old* (they change only at restart)."""
    import msgspec

    return msgspec.structs.replace(new, **{k: getattr(old, k) for k in keep}) if keep else new


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


def _bound(runner: web.AppRunner) -> tuple[str, int] | None:
    """The address a TCP site bound (port 0 resolved)."""
    for name in runner.addresses:
        if isinstance(name, tuple):
            return str(name[0]), int(name[1])
    return None

