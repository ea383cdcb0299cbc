"""Run fastmta as a long-running MTA service: SMTP and HTTP injection, a pickup directory, queue control, metrics.

One process holds the delivery engine and its durable queue
(DATA_DIR/queue); mail comes in over SMTP (AUTH over TLS, or from the
relay networks), the HTTP API (bearer tokens), the pickup directory, and
leaves as fast as each receiver allows. A message is answered 250 (SMTP)
or 202 (HTTP) only once it is in the journal: a crash after that loses
nothing, and a restart resumes the queue.

What it writes in DATA_DIR: queue/ (journal and bodies), accounting.jsonl
(one line per recipient outcome), events/ (the webhook outbox), inbound/
(mail received for the bounce and feedback domains), rejects.jsonl (pickup
input that could not be used), listening.json (the bound addresses),
admin.sock (queue control for `fastmta queue`).

Signals: SIGHUP re-reads the configuration (accounts, tokens, relay
networks, receive domains, DKIM keys, site limits) without dropping a
connection or a message; SIGTERM or SIGINT drains (listeners close,
transactions in flight finish, the queue is synced) and exits 0.

Endpoints (HTTP listener): POST /v1/messages, POST /v1/campaigns,
GET /v1/messages/{id}, GET /metrics (Prometheus), GET /healthz,
GET /readyz (503 when mail cannot be stored: SMTP then answers 451).

Exit status: 0 stopped by a signal after draining; 2 configuration or
usage error (also what --check-config reports); 1 the service failed.

Examples:
  fastmta serve --config /etc/fastmta/fastmta.toml
  fastmta serve --config fastmta.toml --check-config
  fastmta serve --hash-password            # reads a password, prints a scrypt hash for [[serve.users]]
  fastmta serve --hash-token               # prints a new API token and its sha256 for [[serve.http.tokens]]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import json
import logging
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fastmta.cli import UsageError
from fastmta.cli.terminal import SafeFormatter


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE", help="configuration file (TOML): [serve] and the engine's sections")
    p.add_argument("--check-config", action="store_true", help="load and validate the configuration (keys, TLS files, "
                   "DKIM keys, networks), print a summary, exit 0 (valid) or 2")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default: info")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="json: one JSON object per line (time, level, logger, message, extra fields)")
    p.add_argument("--accept-lost-progress", action="store_true",
                   help="start even if the queue's record of which pickup rows were taken is damaged beyond repair "
                        "(those rows may be taken, and sent, again); without it the start is refused")
    p.add_argument("--hash-password", action="store_true",
                   help="read a password (stdin or prompt) and print its scrypt hash for [[serve.users]]")
    p.add_argument("--hash-token", action="store_true",
                   help="print a new random API token and the sha256 to put in [[serve.http.tokens]]")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields a log call adds with ``extra=`` are kept."""

    _STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else SafeFormatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _describe(config: Any) -> dict[str, Any]:
    serve = config.serve
    return {
        "config": config.source,
        "data_dir": serve.data_dir,
        "smtp": [lc.listen for lc in serve.smtp],
        "http": serve.http.listen or None,
        "admin_socket": serve.admin.socket or str(Path(serve.data_dir) / "admin.sock"),
        "pickup": serve.pickup.directory or None,
        "relay_networks": serve.relay_networks,
        "receive_domains": serve.receive_domains,
        "users": [u.name for u in serve.users],
        "http_tokens": [t.name for t in serve.http.tokens],
        "webhooks": [w.url for w in serve.webhooks],
        "dkim": [f"{d.selector}._domainkey.{d.domain}" for d in getattr(config.engine, "dkim", [])],
    }


def _check_files(config: Any) -> None:
    """What the loader cannot see: TLS files readable and a matching pair."""
    from fastmta.smtp.tlscert import server_context

    for i, lc in enumerate(config.serve.smtp):
        if lc.tls_cert:
            try:
                server_context(Path(lc.tls_cert).read_bytes(), Path(lc.tls_key).read_bytes())
            except (OSError, ValueError) as exc:
                raise UsageError(f"configuration error: serve.smtp[{i}]: TLS certificate/key: {exc}") from None
            except Exception as exc:  # ssl.SSLError and friends: a key that is not this certificate's
                raise UsageError(f"configuration error: serve.smtp[{i}]: TLS certificate/key: {exc}") from None


def run(args: argparse.Namespace) -> int:
    if args.hash_password:
        from fastmta.serve.auth import hash_password

        password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise UsageError("empty password")
        print(hash_password(password))
        return 0
    if args.hash_token:
        token = secrets.token_urlsafe(32)
        print(f"token:  {token}\nsha256: {hashlib.sha256(token.encode()).hexdigest()}")
        return 0
    if args.config is None:
        raise UsageError("--config FILE is required")
    from fastmta.errors import ConfigError
    from fastmta.serve.config import load_service_config

    try:
        config = load_service_config(args.config)
        _check_files(config)
    except ConfigError as exc:
        raise UsageError(f"configuration error: {exc}") from None
    if args.check_config:
        print(json.dumps(_describe(config), indent=2))
        return 0
    setup_logging(args.log_level, args.log_format)
    import uvloop

    from fastmta.cli.runtime import tune_gc

    tune_gc()
    try:
        return uvloop.run(_serve(config, args.config, args.accept_lost_progress))
    except ConfigError as exc:
        raise UsageError(f"configuration error: {exc}") from None


async def _serve(config: Any, path: Path, accept_lost_progress: bool) -> int:
    from fastmta.cli.precheck import campaign_checker
    from fastmta.errors import DamagedFile
    from fastmta.queue.spool_errors import SpoolError, SpoolLocked
    from fastmta.serve.service import Service

    log = logging.getLogger("fastmta.serve")
    checker = campaign_checker(config.engine, relayed=False, force=False, note=log.warning)
    service = Service(config, config_path=path, campaign_check=checker, accept_lost_progress=accept_lost_progress)
    try:
        await service.start()
    except SpoolLocked:
        raise UsageError(f"{config.serve.data_dir} is in use by another fastmta process") from None
    except (OSError, DamagedFile, SpoolError) as exc:  # each names its file
        raise UsageError(f"cannot start: {exc}") from None
    loop = asyncio.get_running_loop()

    def reload() -> None:
        try:
            service.reload()
        except Exception as exc:
            log.error("SIGHUP: configuration not reloaded: %s", exc)

    loop.add_signal_handler(signal.SIGHUP, reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    listening = {
        "pid": __import__("os").getpid(),
        "smtp": [f"{h}:{p}" for h, p in service.smtp_addresses],
        "http": f"{service.http_address[0]}:{service.http_address[1]}" if service.http_address else None,
        "admin_socket": str(service.admin_socket) if service.admin_socket else None,
        "admin": f"{service.admin_address[0]}:{service.admin_address[1]}" if service.admin_address else None,
    }
    tmp = service.data_dir / ".listening.json.tmp"
    tmp.write_text(json.dumps(listening) + "\n")
    tmp.replace(service.data_dir / "listening.json")
    print(f"fastmta serve: ready {json.dumps(listening)}", file=sys.stderr, flush=True)
    await service.wait()
    log.info("stopped; %d recipient(s) left in the queue for the next start", service.engine.unfinished)
    return 0 if service.engine.fatal is None else 1
