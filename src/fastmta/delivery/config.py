"""Configuration: msgspec Structs loaded from TOML, unknown keys rejected.

One top-level :class:`Config` holds one Struct per section (``[dns]``,
``[routing]`` for now; sources, sites, dkim and throttle join later as more
fields). Every Struct forbids unknown fields, so a typo such as
``min_tll`` fails loudly instead of silently keeping the default, and
:func:`load_config` turns msgspec's validation errors into a
:class:`~fastmta.errors.ConfigError` that names the file and the key.

Example::

    [dns]
    nameservers = ["127.0.0.1:5353"]   # host or host:port, [v6]:port
    timeout = 5.0
    prefer_ipv6 = false

    [routing]
    smtp_port = 25

    [routing.static]                   # like Postfix's transport map
    "example.com" = ["127.0.0.1:2525"]            # exactly this domain
    ".corp.example" = ["relay.corp.example"]      # its subdomains
    "*" = ["smarthost.example:587"]              # every other domain

    [[dkim]]                           # sign mail by its From domain (fastmta.message.dkim_policy)
    domain = "example.com"
    selector = "s2026"
    key_file = "dkim/s2026.pem"        # relative to this file
    from_domains = ["*.example.com"]
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec

from fastmta.delivery.cluster.config import ClusterConfig
from fastmta.delivery.guard_config import GuardConfig
from fastmta.delivery.limits import ThrottleConfig
from fastmta.delivery.source_config import DEFAULT_POOL, SourceConfig, source_pools
from fastmta.delivery.unsubscribe_config import UnsubscribeConfig
from fastmta.errors import ConfigError
from fastmta.feedback.classify import Classifier, default_classifier
from fastmta.message.dkim_policy import DkimEntry, DkimPolicy

if typing.TYPE_CHECKING:
    import ssl

    from fastmta.smtp.protocol import Credentials

__all__ = [
    "ClassifyConfig",
    "Config",
    "DkimEntry",
    "DnsConfig",
    "HostPort",
    "MtaStsConfig",
    "QueueConfig",
    "RelayAuthConfig",
    "ReturnPathConfig",
    "RoutingConfig",
    "SiteConfig",
    "SmtpConfig",
    "SourceConfig",
    "TimeoutsConfig",
    "UnsubscribeConfig",
    "config_from_dict",
    "load_config",
    "normalize_domain",
    "normalize_route_pattern",
    "parse_config",
    "parse_hostport",
]

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
TtlSeconds = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


@dataclass(frozen=True, slots=True)
class HostPort:
    """A parsed ``host[:port]``; ``host`` is an IP literal or an A-label name."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@functools.lru_cache(maxsize=65536)
def normalize_domain(name: str) -> str:
    """Lower-case A-label form without the trailing dot.

    Cached: every recipient's domain passes through here on the hot path,
    and a campaign has few distinct domains compared with recipients.

    Unicode (IDN) names become A-labels with UTS #46 mapping, as a browser
    or a mail client would do, so ``Bücher.example`` and
    ``xn--bcher-kva.example`` are one domain. Raises ``ValueError`` when the
    name cannot be a DNS name.
    """
    import idna  # local: only this function needs it

    name = name.strip().rstrip(".")
    if not name:
        raise ValueError("empty domain name")
    if name.isascii():
        name = name.lower()
        # ASCII names pass as host names (letters, digits, hyphens) plus
        # underscores, which idna would refuse but real MX targets carry.
        if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
            raise ValueError(f"not a valid domain name: {name!r}")
        return name
    try:
        return idna.encode(name, uts46=True).decode("ascii").lower()
    except idna.IDNAError as exc:
        raise ValueError(f"not a valid internationalized domain name: {name!r} ({exc})") from None


_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_BRACKETED = re.compile(r"^\[([^\]]+)\](?::(\d+))?$")


def parse_hostport(text: str, default_port: int) -> HostPort:
    """Parse ``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (a bare v6 literal too)."""
    text = text.strip()
    m = _BRACKETED.match(text)
    if m:
        host, port_text = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None  # a name, or an unbracketed IPv6 literal
    port = default_port
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"bad port in {text!r}")
        port = int(port_text)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if ":" in host:
            raise ValueError(f"not an IP address or host name: {text!r}") from None
        host = normalize_domain(host)
    return HostPort(host, port)


def normalize_route_pattern(pattern: str) -> str:
    """Canonical static-route pattern: ``*``, ``.parent.example`` or ``domain``.

    ``*.example.com`` is accepted as a spelling of ``.example.com`` (both
    mean "any subdomain of example.com", not example.com itself, as in
    Postfix's transport map with parent_domain_matches_subdomains off).
    """
    p = pattern.strip()
    if p == "*":
        return p
    if p.startswith("*."):
        p = p[1:]
    if p.startswith("."):
        return "." + normalize_domain(p[1:])
    if "*" in p:
        raise ValueError(f"bad route pattern {pattern!r}: use '*', '.domain' or '*.domain'")
    return normalize_domain(p)


class DnsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[dns]``: how MX and address lookups are made and cached."""

    #: ``host`` or ``host:port`` (``[v6]:port``). Empty: the system's
    #: resolv.conf. Tests always set this to their loopback server.
    nameservers: list[str] = []
    #: Seconds one lookup may take in all (every server and retry).
    timeout: Seconds = 5.0
    #: Record TTLs are clamped to [min_ttl, max_ttl] seconds.
    min_ttl: TtlSeconds = 30
    max_ttl: TtlSeconds = 3600
    #: Negative answers (NXDOMAIN, no data; RFC 2308: the SOA minimum)
    #: are cached for their TTL clamped to these bounds.
    negative_min_ttl: TtlSeconds = 30
    negative_max_ttl: TtlSeconds = 900
    #: Entries (one per name and record type) kept; least recently used go first.
    cache_size: PositiveInt = 10_000
    #: Queries in flight at once; more wait their turn.
    max_concurrent: PositiveInt = 64
    #: Order each MX host's IPv6 addresses before its IPv4 ones.
    prefer_ipv6: bool = False

    def __post_init__(self) -> None:
        if self.min_ttl > self.max_ttl:
            raise ValueError(f"min_ttl ({self.min_ttl}) is greater than max_ttl ({self.max_ttl})")
        if self.negative_min_ttl > self.negative_max_ttl:
            raise ValueError(
                f"negative_min_ttl ({self.negative_min_ttl}) is greater than "
                f"negative_max_ttl ({self.negative_max_ttl})"
            )
        for ns in self.nameservers:
            hp = parse_hostport(ns, 53)
            if not hp.is_ip:
                # A name would need a resolver to find the resolver.
                raise ValueError(f"nameserver {ns!r} must be an IP address (optionally with :port)")

    def nameserver_addresses(self) -> list[HostPort]:
        return [parse_hostport(ns, 53) for ns in self.nameservers]


class RelayAuthConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[routing.auth."HOST"]``: log in at this relay (SMTP AUTH, RFC 4954: PLAIN, else LOGIN)."""

    username: str
    #: The password alone in a file, kept out of the configuration (a relative path: from the
    #: configuration file's directory). Read at start; a missing or empty file is a start-up error.
    password_file: str
    #: Send the credentials without TLS. Off: a relay that offers no STARTTLS gets none (the mail waits).
    allow_plaintext: bool = False
    #: Verify the relay's certificate (the system's CAs and ``[smtp] tls_ca_file``) before the login goes:
    #: unverified, an attacker on the path answers STARTTLS and reads the password. Off only for a relay
    #: with a certificate nothing can verify, on a network of your own.
    tls_verify: bool = True


class RoutingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[routing]``: where mail for a domain goes."""

    #: Port used for hosts found through MX (or implicit MX) lookups.
    smtp_port: Port = 25
    #: Domain pattern -> ``host[:port]`` list, tried in order. Patterns:
    #: ``example.com`` exactly, ``.example.com`` / ``*.example.com`` its
    #: subdomains, ``*`` everything else. A host may be a name (looked up
    #: as A/AAAA, never MX) or an IP literal. Port defaults to smtp_port.
    static: dict[str, list[str]] = {}
    #: ``host`` or ``host:port`` of a relay (as in ``static``) -> how to log in there.
    auth: dict[str, RelayAuthConfig] = {}
    #: Envelope sender domain -> the egress pool of its mail (when the message's meta names none).
    pool_by_sender: dict[str, str] = {}

    def credentials(self, verifying: ssl.SSLContext | None = None) -> dict[tuple[str, int | None], Credentials]:
        """Each relay's credentials by (host, port; None: any port), the keys read as static route hosts
        are (``[v6]:port``, a U-label, a trailing dot); reads the password files. A key that names no
        static route host is an error: its relay would be mailed without the login it needs.
        *verifying*: the TLS context of the sessions of a relay whose certificate is verified."""
        from fastmta.smtp.protocol import Credentials

        routed = [hp for hosts in self.static_routes().values() for hp in hosts]
        out: dict[tuple[str, int | None], Credentials] = {}
        for key, entry in self.auth.items():
            where = f"routing.auth.{key}"
            try:
                hp = parse_hostport(key, 0)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            port = hp.port or None
            if not any(r.host == hp.host and port in (None, r.port) for r in routed):
                raise ConfigError(f"{where}: names no host of [routing.static] (its login would never be used)")
            try:  # utf-8-sig: a BOM an editor wrote is not part of the password
                password = Path(entry.password_file).read_text(encoding="utf-8-sig").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{where}.password_file: {exc}") from None
            if not password:
                raise ConfigError(f"{where}.password_file: {entry.password_file} is empty")
            if "\0" in password or "\0" in entry.username or not entry.username:
                raise ConfigError(f"{where}: an empty username, or a NUL in it or the password (AUTH PLAIN "
                                  "separates its fields with NUL)")
            context = verifying if entry.tls_verify else None
            out[(hp.host, port)] = Credentials(entry.username, password, entry.allow_plaintext, context)
        return out

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for pattern, hosts in self.static.items():
            try:
                canon = normalize_route_pattern(pattern)
            except ValueError as exc:
                raise ValueError(f"static route {pattern!r}: {exc}") from None
            if canon in seen:
                raise ValueError(f"static routes {seen[canon]!r} and {pattern!r} are the same pattern")
            seen[canon] = pattern
            if not hosts:
                raise ValueError(f"static route {pattern!r} has no hosts")
            for host in hosts:
                try:
                    parse_hostport(host, self.smtp_port)
                except ValueError as exc:
                    raise ValueError(f"static route {pattern!r}: {exc}") from None

    def static_routes(self) -> dict[str, list[HostPort]]:
        """Static routes keyed by canonical pattern (see :func:`normalize_route_pattern`)."""
        return {
            normalize_route_pattern(pattern): [parse_hostport(h, self.smtp_port) for h in hosts]
            for pattern, hosts in self.static.items()
        }


class SiteConfig(ThrottleConfig, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[sites."PATTERN"]``: limits for sites whose name or any MX host matches PATTERN (glob).

    The first matching pattern (file order) wins, then the built-in provider
    table (Gmail, Yahoo, Outlook, ...: ``fastmta.delivery.limits.PROVIDERS``), then
    the defaults. Besides the throttle's fields (``max_connections``,
    ``max_messages_per_connection``, ``rate``, ``connection_rate``,
    ``[sites."PATTERN".adaptive]``; see ``fastmta.delivery.limits.ThrottleConfig``):
    """

    max_recipients_per_transaction: PositiveInt = 50
    #: Close a connection after this many seconds without work.
    idle_timeout: Seconds = 30.0
    #: Transactions in flight per connection (2 lets the next envelope ride with the content).
    pipeline_depth: PositiveInt = 2
    #: TLS at these sites instead of [smtp] tls: "opportunistic", "required" or "never" (Postfix's
    #: smtp_tls_policy_maps, PowerMTA's use-starttls / require-starttls). None: [smtp]'s.
    tls: str | None = None
    #: Verify these sites' certificates (None: [smtp] tls_verify). True here also makes TLS required
    #: unless ``tls`` says otherwise (Postfix's "verify" level). An MTA-STS policy verifies anyway.
    tls_verify: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tls is not None and self.tls not in ("opportunistic", "required", "never"):
            raise ValueError(f"tls must be 'opportunistic', 'required' or 'never', not {self.tls!r}")


class QueueConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[queue]``: retries, lifetime and memory bounds."""

    retry_initial: Seconds = 60.0
    retry_factor: Annotated[float, msgspec.Meta(ge=1.0)] = 2.0
    #: Longest wait between two attempts (also caps the classifier's hints,
    #: e.g. 4 h for a full mailbox).
    retry_max: Seconds = 14400.0
    retry_jitter: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.2
    #: A recipient still not delivered after this long is expired (5 days, like Postfix).
    max_lifetime: Seconds = 5 * 86400.0
    #: submit() waits while this many recipients are unfinished (backpressure).
    max_queued_recipients: PositiveInt = 100_000
    #: ... or while the unfinished messages' bodies hold this many bytes of memory.
    max_queued_bytes: PositiveInt = 128 * 1024 * 1024
    #: ... or while this many accepted recipients were never tried yet (the
    #: read-ahead; Postfix's qmgr_message_active_limit plays this part).
    #: Deferred recipients do not count. 10,000 is seconds of work at full
    #: speed, and keeps a 1,000,000-row campaign's memory flat.
    max_untried_recipients: PositiveInt = 10_000
    #: A host that refused a connection is tried last for this long.
    host_down_time: Seconds = 60.0


class TimeoutsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[smtp.timeouts]``: seconds per phase; defaults from RFC 5321 4.5.3.2."""

    connect: Seconds = 60.0
    greeting: Seconds = 300.0
    ehlo: Seconds = 300.0
    starttls: Seconds = 120.0
    mail: Seconds = 300.0
    rcpt: Seconds = 300.0
    data: Seconds = 120.0
    data_block: Seconds = 180.0
    end_of_data: Seconds = 600.0
    rset: Seconds = 120.0
    quit: Seconds = 60.0
    #: The reply to a MAIL pipelined after a transaction, until the connection has answered one
    #: (a server that drops such commands costs this, once a site; fastmta.smtp.connection.Timeouts).
    mail_after_data: Seconds = 15.0


class MtaStsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[smtp.mta_sts]``: honour the MTA-STS policies domains publish (RFC 8461; ``fastmta.delivery.mta_sts``)."""

    enabled: bool = True
    #: Seconds a policy fetch (HTTPS) may take in all.
    timeout: Seconds = 10.0
    #: Where policies are fetched: RFC 8461's 443, moved only for a test or an operator's proxy.
    https_port: Port = 443


class SmtpConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[smtp]``: how the client talks to MX hosts."""

    #: "opportunistic" (STARTTLS when offered), "required" or "never".
    tls: str = "opportunistic"
    #: Verify certificates (off by default between MTAs, like Postfix's "may").
    tls_verify: bool = False
    #: PEM certificates trusted besides the system's when a certificate is verified (tls_verify, an
    #: MTA-STS policy and its fetch); "" trusts the system's only.
    tls_ca_file: str = ""
    mta_sts: MtaStsConfig = msgspec.field(default_factory=MtaStsConfig)
    #: DANE (RFC 7672; Postfix's "dane" level, KumoMTA's enable_dane): an MX host whose MX, address
    #: and TLSA records the resolver validated gets STARTTLS required and its certificate checked
    #: against the TLSA records; a mismatch defers its mail. It trusts the resolver's AD bit: set
    #: [dns] nameservers to a validating resolver on this host (unbound, as Postfix asks).
    dane: bool = False
    #: Outbound connections open at once over every site (PowerMTA's max-smtp-out). Default, and
    #: upper bound: as many as the open-files limit leaves room for (fastmta.delivery.budget).
    max_connections: PositiveInt | None = None
    timeouts: TimeoutsConfig = msgspec.field(default_factory=TimeoutsConfig)

    def __post_init__(self) -> None:
        if self.tls not in ("opportunistic", "required", "never"):
            raise ValueError(f"tls must be 'opportunistic', 'required' or 'never', not {self.tls!r}")


class ReturnPathConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Signed return paths (VERP) for campaign mail (``fastmta.message.returnpath``); off while *domain* is empty."""

    domain: str = ""  # the bounce domain, e.g. "bounces.example.com" (its MX points at fastmta serve)
    secret_file: str = ""  # 16+ bytes of secret (a file, so it stays out of the configuration)
    prefix: str = "b"

    def __post_init__(self) -> None:
        if self.domain and not self.secret_file:
            raise ValueError("return_path.domain needs return_path.secret_file")


class ClassifyConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[classify]``: the operator's reply-classification rules, merged into the built-in ones.

    ``rules`` is a rule file in the format of the built-in
    ``fastmta/feedback/classify_rules.toml`` (``[[rule]]``,
    ``[categories.X]``, ``[local.Y]``, ``hard_categories``,
    ``replace_builtin``; a path relative to the configuration file), or the
    rules themselves inline (``[[classify.rules]]`` tables). The other keys
    are the rule file's tables, given here. A rule named like a built-in one
    replaces it; new rules go first (see ``Classifier.from_rules``). Checked
    when the configuration is loaded; errors name the rule.
    """

    rules: str | list[dict[str, Any]] | None = None
    categories: dict[str, dict[str, Any]] = {}
    local: dict[str, dict[str, Any]] = {}
    hard_categories: list[str] | None = None
    replace_builtin: bool = False

    def document(self) -> tuple[dict[str, Any] | None, str]:
        """The extra rules as one document of the rule file's format (None: none), and where they came from."""
        doc: dict[str, Any] = {}
        origin = "[classify]"
        if isinstance(self.rules, str):
            import tomllib

            try:
                doc = tomllib.loads(Path(self.rules).read_text("utf-8"))
            except OSError as exc:
                raise ConfigError(f"[classify] rules: cannot read {self.rules}: {exc.strerror or exc}") from None
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"[classify] rules: {self.rules}: not valid TOML: {exc}") from None
            origin = self.rules
        elif self.rules is not None:
            doc["rule"] = list(self.rules)
        for key in ("categories", "local"):
            value = getattr(self, key)
            if value:
                doc.setdefault(key, {}).update(value)
        if self.hard_categories is not None:
            doc["hard_categories"] = list(self.hard_categories)
        if self.replace_builtin:
            doc["replace_builtin"] = True
        return (doc or None), origin

    def classifier(self) -> Classifier:
        """The classifier these rules make (the shared built-in one when there are none)."""
        doc, origin = self.document()
        return default_classifier() if doc is None else Classifier.from_rules(doc, origin=origin)


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The whole configuration; every section has working defaults."""

    dns: DnsConfig = msgspec.field(default_factory=DnsConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    sources: list[SourceConfig] = []
    sites: dict[str, SiteConfig] = {}
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    smtp: SmtpConfig = msgspec.field(default_factory=SmtpConfig)
    return_path: ReturnPathConfig = msgspec.field(default_factory=ReturnPathConfig)
    #: ``[unsubscribe]``: RFC 8058 one-click headers on campaign mail (fastmta.delivery.unsubscribe_config).
    unsubscribe: UnsubscribeConfig = msgspec.field(default_factory=UnsubscribeConfig)
    classify: ClassifyConfig = msgspec.field(default_factory=ClassifyConfig)
    #: ``[guard]``: campaign brakes and source rotation on live KPIs (fastmta.delivery.guard_config).
    guard: GuardConfig = msgspec.field(default_factory=GuardConfig)
    #: ``[[dkim]]``: keys that sign every message by its From domain (campaigns bring their own).
    dkim: list[DkimEntry] = []
    #: ``[cluster]``: limits and leases shared with other nodes through Redis (fastmta.delivery.cluster).
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)

    def dkim_policy(self) -> DkimPolicy:
        """The signing policy of the ``[[dkim]]`` entries; reads every key file (once per call: build it once)."""
        return DkimPolicy.from_config(self.dkim)

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate source name(s): {', '.join(dupes)}")
        pools = source_pools(self.sources)
        for domain, pool in self.routing.pool_by_sender.items():
            if pool not in pools:
                raise ValueError(f"routing.pool_by_sender.{domain}: no source is in pool {pool!r}")
        if DEFAULT_POOL not in pools:
            raise ValueError("sources: none is in the default pool (mail that names no pool would have no source): "
                             'leave one without pools, or give it pools = ["default", ...]')
        if self.unsubscribe.active and not (self.unsubscribe.secret_file or self.return_path.secret_file):
            raise ValueError("unsubscribe.base_url needs unsubscribe.secret_file or return_path.secret_file")


_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<key>[^`]+)`$")


def _describe(exc: msgspec.ValidationError) -> str:
    """``field.path: reason`` from msgspec's ``reason - at `$.field.path` ``."""
    text = str(exc)
    m = _AT.match(text)
    msg, path = (m.group("msg"), m.group("path")) if m else (text, "")
    unknown = _UNKNOWN.match(msg)
    if unknown:
        path = f"{path}.{unknown.group('key')}"
        msg = "unknown key"
    path = path.lstrip(".")
    return f"{path}: {msg}" if path else msg


def _name_the_key(text: str, data: Any, struct: type) -> str:
    """msgspec writes a table's key as ``[...]`` (``sites[...].rate``): put the key back (``sites."*".rate``).

    Found by validating the table's entries one by one; the first that fails is the one (TOML keeps order).
    """
    head, sep, _ = text.partition("[...]")
    fields = head.split(":", 1)[0].strip(".").split(".") if sep else []
    if not fields or not all(f.isidentifier() for f in fields):
        return text
    value_type: Any = struct
    for name in fields:
        hints = typing.get_type_hints(value_type) if isinstance(value_type, type) else {}
        if name not in hints or not isinstance(data, dict):
            return text
        value_type, data = hints[name], data.get(name)
    args = typing.get_args(value_type)
    if typing.get_origin(value_type) is not dict or len(args) != 2 or not isinstance(data, dict):
        return text
    for key, entry in data.items():
        try:
            msgspec.convert(entry, args[1])
        except msgspec.ValidationError:
            return text.replace("[...]", f".{json.dumps(str(key))}", 1)
    return text


def config_from_dict(data: dict[str, Any], source: str = "<config>", base_dir: str | Path | None = None) -> Config:
    """Validate an already-parsed mapping (TOML, JSON, a test's dict).

    *base_dir*: where relative paths in it start (the configuration file's
    directory); default the current directory.
    """
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_name_the_key(_describe(exc), data, Config)}") from None
    rules = config.classify.rules
    if isinstance(rules, str) and base_dir is not None and not Path(rules).is_absolute():
        classify = msgspec.structs.replace(config.classify, rules=str(Path(base_dir) / rules))
        config = msgspec.structs.replace(config, classify=classify)
    if base_dir is not None and any(not Path(e.key_file).is_absolute() for e in config.dkim):
        dkim = [
            e if Path(e.key_file).is_absolute() else msgspec.structs.replace(e, key_file=str(Path(base_dir) / e.key_file))
            for e in config.dkim
        ]
        config = msgspec.structs.replace(config, dkim=dkim)
    if base_dir is not None and config.routing.auth:
        auth = {h: a if Path(a.password_file).is_absolute() else msgspec.structs.replace(
                    a, password_file=str(Path(base_dir) / a.password_file)) for h, a in config.routing.auth.items()}
        config = msgspec.structs.replace(config, routing=msgspec.structs.replace(config.routing, auth=auth))
    ca_file = config.smtp.tls_ca_file
    if ca_file and base_dir is not None and not Path(ca_file).is_absolute():
        config = msgspec.structs.replace(
            config, smtp=msgspec.structs.replace(config.smtp, tls_ca_file=str(Path(base_dir) / ca_file)))
    if config.smtp.tls_ca_file:
        _check_ca_file(config.smtp.tls_ca_file, source)
    try:
        config.routing.credentials()  # the relays' password files, read now
        config.classify.classifier()  # the rules are checked now, not at the first reply
        config.dkim_policy()  # and the keys: a missing or wrong one is a start-up error
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def _check_ca_file(path: str, source: str) -> None:
    """Load *path* as trusted certificates now: a file that holds none would fail every verification."""
    import ssl

    if not Path(path).is_file():
        raise ConfigError(f"{source}: smtp.tls_ca_file: no such file: {path}")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)  # not the system's: not needed
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{source}: smtp.tls_ca_file: {path} holds no usable certificate ({exc})") from None


def parse_config(text: str | bytes, source: str = "<config>", base_dir: str | Path | None = None) -> Config:
    """Parse and validate TOML text; errors name *source* and the key."""
    import tomllib

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: not UTF-8: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return config_from_dict(data, source, base_dir)


def load_config(path: str | Path) -> Config:
    """Read, parse and validate the TOML file at *path*."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_config(text, str(path), Path(path).parent)
