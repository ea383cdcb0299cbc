"""The ``[serve]`` section: listeners, who may relay, API tokens, the pickup directory, webhooks.

It lives in the same TOML file as the engine's configuration (``[dns]``,
``[[sources]]``, ``[sites]``, ``[[dkim]]`` ...): :func:`load_service_config`
takes ``[serve]`` out, validates it here and hands the rest to
:func:`fastmta.delivery.config.config_from_dict`, so one file describes the
whole service and every error names the file and the key.

Example::

    [serve]
    hostname = "mta.example.com"
    data_dir = "/var/lib/fastmta"            # queue, events outbox, admin socket
    relay_networks = ["127.0.0.0/8", "::1/128", "10.1.0.0/16"]
    receive_domains = ["bounces.example.com"]

    [[serve.smtp]]
    listen = "0.0.0.0:587"
    tls_cert = "/etc/fastmta/tls.crt"
    tls_key = "/etc/fastmta/tls.key"

    [[serve.users]]                          # AUTH PLAIN/LOGIN, over TLS only
    name = "app1"
    password_hash = "scrypt$16384$8$1$..."   # fastmta serve --hash-password

    [serve.http]
    listen = "127.0.0.1:8025"
    [[serve.http.tokens]]
    name = "backend"
    sha256 = "9f86d0..."                     # sha256 hex of the bearer token

    [serve.pickup]
    directory = "/var/spool/fastmta/pickup"

    [[serve.webhooks]]
    url = "https://hooks.example.com/fastmta"
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec

from fastmta.delivery.config import Config, config_from_dict
from fastmta.errors import ConfigError
from fastmta.queue.records import RESERVED_META
from fastmta.serve.events import WebhookEndpoint
from fastmta.smtp.dsn_params import DSN_META

__all__ = [
    "AdminConfig",
    "HttpConfig",
    "PickupConfig",
    "ServeConfig",
    "ServiceConfig",
    "SmtpListenerConfig",
    "TokenConfig",
    "UserConfig",
    "load_service_config",
    "parse_service_config",
]

Size = Annotated[int, msgspec.Meta(ge=1024)]
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _listen(value: str, what: str) -> tuple[str, int]:
    """``IP:PORT`` or ``[IPv6]:PORT``; port 0 binds a free port (listening.json tells which)."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError
    except ValueError:
        raise ValueError(f"{what}: listen must be an IP address and port (e.g. 127.0.0.1:2525), not {value!r}") from None
    return host, int(port)


class SmtpListenerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One SMTP listener (submission/injection, or port 25 for the bounce domains)."""

    listen: str = "127.0.0.1:2525"
    #: PEM files for STARTTLS; neither: a self-signed certificate is made at start
    #: (fine for a private network; clients that verify need a real one).
    tls_cert: str = ""
    tls_key: str = ""
    max_message_size: Size = 50 * 1024 * 1024
    max_recipients: Annotated[int, msgspec.Meta(ge=1)] = 1000
    #: Open connections to this listener; more get 421 before the greeting. Per listener, as
    #: Postfix's master.cf process limit is per service: internet traffic on port 25 (bounces,
    #: complaints) cannot crowd the backends out of the submission listener.
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 1000
    #: Open connections to this listener from one client address; clients in relay_networks are
    #: exempt (Postfix's smtpd_client_connection_count_limit and its exceptions, $mynetworks).
    max_connections_per_ip: Annotated[int, msgspec.Meta(ge=1)] = 50

    def __post_init__(self) -> None:
        _listen(self.listen, "serve.smtp")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("serve.smtp: give both tls_cert and tls_key, or neither")

    @property
    def address(self) -> tuple[str, int]:
        return _listen(self.listen, "serve.smtp")


class UserConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """An SMTP AUTH account: a name and a scrypt hash (never the password itself)."""

    name: str
    password_hash: str


class TokenConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """An API bearer token, by its SHA-256 (tokens are long random strings, not passwords)."""

    name: str
    sha256: str

    def __post_init__(self) -> None:
        if not _HEX64.match(self.sha256):
            raise ValueError(f"token {self.name!r}: sha256 must be 64 lower-case hex digits")


class HttpConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The HTTP injection API (and /metrics, /healthz, /readyz)."""

    listen: str = ""  # empty: no HTTP listener
    tokens: list[TokenConfig] = []
    max_request_size: Size = 50 * 1024 * 1024
    #: Open connections at once; more get 503 and are closed (nginx's worker_connections).
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 512
    #: A connection with no request in progress this long (since it opened, or since its last
    #: response) is closed: the header and keep-alive deadline (nginx's client_header_timeout).
    idle_timeout: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    #: A request body must arrive at least this fast (octets a second, averaged over idle_timeout).
    min_body_rate: Annotated[float, msgspec.Meta(ge=0)] = 1024.0

    def __post_init__(self) -> None:
        if self.listen:
            _listen(self.listen, "serve.http")

    @property
    def address(self) -> tuple[str, int] | None:
        return _listen(self.listen, "serve.http") if self.listen else None


class AdminConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Queue control (``fastmta queue``): a unix socket, and optionally loopback TCP with tokens."""

    socket: str = ""  # default DATA_DIR/admin.sock
    listen: str = ""
    tokens: list[TokenConfig] = []

    def __post_init__(self) -> None:
        if self.listen:
            host, _ = _listen(self.listen, "serve.admin")
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError("serve.admin: listen must be a loopback address (use the unix socket remotely via ssh)")
            if not self.tokens:
                raise ValueError("serve.admin: a TCP listener needs tokens")


class PickupConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """A directory watched for ``fastmta send`` inputs (*.eml pickup files, *.toml campaign jobs)."""

    directory: str = ""  # empty: no pickup
    interval: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    #: A file younger than this (mtime) is left for the next scan: it may still be written
    #: (writers should write a dot-file and rename it, as Postfix's maildrop does).
    settle: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    #: Delete a pickup file once it is durably queued (Postfix's pickup does); false keeps it
    #: (it is still sent once: inputs are known by content).
    delete: bool = True
    #: Run ``fastmta check`` on each campaign job before it starts; one with errors is moved to
    #: ``.rejected/`` with the findings (fix it and drop it again), warnings are logged.
    check: bool = True


_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext
_META_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# How and by whom it came in, where and how it went: never the client's to say.
SERVICE_META = frozenset({"via", "auth", DSN_META}) | RESERVED_META


class ServeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    hostname: str = "localhost"
    data_dir: str = "/var/lib/fastmta"
    smtp: list[SmtpListenerConfig] = []
    #: Clients from these networks may relay without AUTH (Postfix's mynetworks).
    relay_networks: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    #: Domains this service receives mail for (bounce, FBL, unsubscribe): anyone may send to them.
    receive_domains: list[str] = []
    users: list[UserConfig] = []
    #: Mail to the receive domains that nobody could read (inbound/unrecognized) is kept this many days,
    #: and at most this many bytes (the oldest go first): anyone may send it.
    keep_unrecognized_days: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    keep_unrecognized_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1 << 30
    #: Failed AUTH attempts per connection before it is closed.
    max_auth_failures: Annotated[int, msgspec.Meta(ge=1)] = 3
    #: Bytes of message content held in memory while it arrives over SMTP, over every connection; clients
    #: outside relay_networks without a login (mail to the receive domains) have a quarter of it.
    receiving_memory: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 256 * 1024 * 1024
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    pickup: PickupConfig = msgspec.field(default_factory=PickupConfig)
    webhooks: list[WebhookEndpoint] = []
    #: Delivery status notifications (RFC 3464) to the senders of relayed mail when a recipient bounces or expires.
    dsn: bool = True
    #: Also warn senders of mail still deferred after this many seconds (Postfix's delay_warning_time; 0: never).
    delay_warning_time: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: At most this many notices per sender address per 10 minutes (more are logged, not sent).
    dsn_per_sender: Annotated[int, msgspec.Meta(ge=1)] = 20
    #: How long SIGTERM waits for transactions in flight before exiting (the queue keeps the rest).
    drain_timeout: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    #: How long an injection (SMTP, HTTP) waits for room in a full queue before it is refused with
    #: 451 / 503 to try again later; never accepted after that (the client retries: no second copy).
    max_queue_wait: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: Header -> meta key, read from mail injected over SMTP or by pickup (fastmta.serve.meta_headers):
    #: {"X-Job" = "job", "X-Virtual-MTA" = "pool"}, PowerMTA's process-x-job and X-Virtual-MTA.
    meta_headers: dict[str, str] = {}
    #: Take those headers out before the mail goes on (never one a DKIM signature of the client covers).
    strip_meta_headers: bool = True

    def __post_init__(self) -> None:
        if not _HOSTNAME.match(self.hostname):
            raise ValueError(f"serve.hostname: not a host name: {self.hostname!r}")
        for header, key in self.meta_headers.items():
            if not _HEADER_NAME.fullmatch(header):
                raise ValueError(f"serve.meta_headers: not a header name: {header!r}")
            if not _META_KEY.fullmatch(key) or key in SERVICE_META:
                raise ValueError(f"serve.meta_headers.{header}: meta key {key!r}: 1-64 characters of A-Z a-z 0-9 _ . -, "
                                 f"not one the service sets ({', '.join(sorted(SERVICE_META))})")
        for net in self.relay_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"serve.relay_networks: not a network: {net!r}") from None
        for user in self.users:
            if not user.password_hash.startswith("scrypt$"):
                raise ValueError(f"serve.users {user.name!r}: password_hash must be a scrypt hash "
                                 "(make one with: fastmta serve --hash-password)")

    @property
    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.relay_networks]


class ServiceConfig(msgspec.Struct, frozen=True):
    """The engine's configuration and the service's, from one file."""

    engine: Config
    serve: ServeConfig
    source: str = "<config>"


def _describe(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    m = re.match(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", text, re.S)
    msg, path = (m.group("msg"), m.group("path").lstrip(".")) if m else (text, "")
    unknown = re.match(r"^Object contains unknown field `(?P<key>[^`]+)`$", msg)
    if unknown:
        return f"serve.{path + '.' if path else ''}{unknown.group('key')}: unknown key"
    return f"serve.{path}: {msg}" if path else f"serve: {msg}"


def parse_service_config(data: dict[str, Any], source: str = "<config>", base_dir: Path | None = None) -> ServiceConfig:
    data = dict(data)
    serve_data = data.pop("serve", {})
    engine = config_from_dict(data, source, base_dir)
    try:
        serve = msgspec.convert(serve_data, ServeConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    if base_dir is not None:
        serve = _relative_to(serve, base_dir)
    return ServiceConfig(engine, serve, source)


def _relative_to(serve: ServeConfig, base: Path) -> ServeConfig:
    """Paths in the file are relative to the file, as [classify] rules and [[dkim]] keys are."""

    def fix(p: str) -> str:
        return str(base / p) if p and not Path(p).is_absolute() else p

    smtp = [msgspec.structs.replace(s, tls_cert=fix(s.tls_cert), tls_key=fix(s.tls_key)) for s in serve.smtp]
    return msgspec.structs.replace(
        serve, data_dir=fix(serve.data_dir), smtp=smtp,
        pickup=msgspec.structs.replace(serve.pickup, directory=fix(serve.pickup.directory)),
        admin=msgspec.structs.replace(serve.admin, socket=fix(serve.admin.socket)),
    )


def load_service_config(path: Path) -> ServiceConfig:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_service_config(data, str(path), path.parent)
