"""Reply classification: SMTP reply or local failure -> what it means.

Everything downstream (retries, throttle, suppression, accounting) asks one
question of a failed attempt: *what happened, to whom does it apply, and
when is it worth trying again?* This module answers it with a
:class:`Classification`. The knowledge lives in data
(``classify_rules.toml``: ordered rules over reply code, RFC 3463 enhanced
code, SMTP phase and text), so operators can extend or override it from
their configuration without touching code (:meth:`Classifier.from_rules`).

Hot-path notes: regexes are compiled once per classifier, and results are
memoised per (code, enhanced, phase, text) in a bounded cache, because a
throttled site answers thousands of recipients with the same reply.
"""

from __future__ import annotations

import re
import tomllib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from functools import lru_cache
from importlib import resources
from typing import Any, TypeVar

from fastmta.errors import ConfigError, Scope
from fastmta.smtp.reply import Reply

__all__ = [
    "BounceType",
    "Category",
    "Classification",
    "Classifier",
    "LocalFailure",
    "Outcome",
    "Phase",
    "classify",
    "classify_local",
    "default_classifier",
]


_E = TypeVar("_E", bound=Enum)


class Outcome(StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class BounceType(StrEnum):
    HARD = "hard"  # the address is bad: suppress it
    SOFT = "soft"  # failed (or deferred) for a reason that may pass
    NONE = "none"  # not a bounce at all


class Category(StrEnum):
    """Why an attempt ended as it did (names follow corpora/README.md)."""

    DELIVERED = "delivered"
    INVALID_RECIPIENT = "invalid_recipient"
    INVALID_DOMAIN = "invalid_domain"
    INACTIVE_MAILBOX = "inactive_mailbox"
    MAILBOX_FULL = "mailbox_full"
    MESSAGE_TOO_LARGE = "message_too_large"
    SPAM_OR_VIRUS = "spam_or_virus"
    CONTENT_FILTERED = "content_filtered"
    MESSAGE_FORMAT = "message_format"
    POLICY = "policy"
    REPUTATION_BLOCK = "reputation_block"
    AUTH_FAILURE = "auth_failure"
    RATE_LIMITED = "rate_limited"
    GREYLISTED = "greylisted"
    RELAY_DENIED = "relay_denied"
    SENDER_REJECTED = "sender_rejected"
    REMOTE_SYSTEM = "remote_system"
    NETWORK = "network"
    PROTOCOL_ERROR = "protocol_error"
    EXPIRED = "expired"
    AUTO_REPLY = "auto_reply"
    COMPLAINT = "complaint"
    UNKNOWN = "unknown"


class Phase(StrEnum):
    """The SMTP step a reply answered. ``EOD`` is the reply after the final dot."""

    CONNECT = "connect"
    EHLO = "ehlo"
    HELO = "helo"
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    EOD = "eod"
    QUIT = "quit"

    @classmethod
    def parse(cls, value: Phase | str | None) -> Phase | None:
        """Accept our names and the spellings bounces use ("RCPT TO", "end of DATA")."""
        if value is None or isinstance(value, Phase):
            return value
        key = value.strip().lower().replace("_", " ")
        return _PHASE_ALIASES.get(key)


_PHASE_ALIASES: dict[str, Phase] = {p.value: p for p in Phase} | {
    "greeting": Phase.CONNECT,
    "banner": Phase.CONNECT,
    "initial connection": Phase.CONNECT,
    "lhlo": Phase.EHLO,
    "mail from": Phase.MAIL,
    "rcpt to": Phase.RCPT,
    "end of data": Phase.EOD,
    "final data": Phase.EOD,
    "bdat": Phase.EOD,
    "message": Phase.EOD,
    "text": Phase.EOD,
}


class LocalFailure(StrEnum):
    """Failures on our side of the wire; the table in the rules file maps them."""

    DNS_NXDOMAIN = "dns_nxdomain"
    DNS_NULL_MX = "dns_null_mx"
    DNS_NO_MAIL_HOST = "dns_no_mail_host"
    DNS_SERVFAIL = "dns_servfail"
    DNS_TIMEOUT = "dns_timeout"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    CONNECTION_LOST = "connection_lost"
    TLS_FAILED = "tls_failed"
    TIMEOUT = "timeout"
    PROTOCOL_ERROR = "protocol_error"
    MESSAGE_TOO_LARGE = "message_too_large"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Classification:
    """What one reply (or local failure) means for delivery.

    ``retry_after`` is a hint in seconds for the next attempt (None: use the
    default schedule; meaningless when permanent). ``site_paced``: retry as
    soon as the site's throttle allows rather than on the recipient's own
    timer. ``suspend_for``: suspend the (source, site) for that long.
    ``rule`` names the rule that decided, for logs and debugging.
    """

    outcome: Outcome
    category: Category
    bounce: BounceType
    scope: Scope
    retry_after: float | None = None
    site_paced: bool = False
    suspend_for: float | None = None
    rule: str = ""

    @property
    def is_throttle_signal(self) -> bool:
        """A transient failure about the whole site/source: slow down."""
        return self.outcome is Outcome.TRANSIENT and self.scope is Scope.SITE

    @property
    def is_hard_bounce(self) -> bool:
        return self.bounce is BounceType.HARD


# --------------------------------------------------------------------------
# Rules


_RULE_KEYS = frozenset(
    {
        "name", "codes", "enhanced", "except_enhanced", "phase", "when", "text", "unless",
        "category", "scope", "outcome", "bounce", "retry_after", "site_paced",
        "suspend", "disable",
    }
)  # fmt: skip
_MATCH_KEYS = ("codes", "enhanced", "phase", "when", "text", "unless")
_CATEGORY_KEYS = frozenset({"scope", "retry_after", "site_paced", "suspend"})
_LOCAL_KEYS = frozenset({"outcome", "category", "scope", "retry_after", "site_paced", "suspend"})
_TOP_KEYS = frozenset({"rule", "categories", "local", "hard_categories", "replace_builtin"})

_CODE_SPEC = re.compile(r"^([2-5])(xx|\d\d)$|^([2-5]\d\d)-([2-5]\d\d)$", re.IGNORECASE)
_ENH_SPEC = re.compile(r"^([245x*])\.(\d{1,3}|\*)\.(\d{1,3}\*?|\*)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class _Enh:
    """A parsed enhanced status code: class, subject, detail."""

    cls: int
    subject: int
    detail: int


def _parse_enhanced(value: str | None) -> _Enh | None:
    if not value:
        return None
    parts = value.strip().lstrip("#").split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    cls, subject, detail = (int(p) for p in parts)
    if cls not in (2, 4, 5):
        return None
    return _Enh(cls, subject, detail)


@dataclass(frozen=True, slots=True)
class _EnhPattern:
    cls: int | None
    subject: int | None
    detail: int | None
    detail_prefix: str | None  # "60*" matches 600-609, 60, 6000...

    def matches(self, e: _Enh) -> bool:
        if self.cls is not None and self.cls != e.cls:
            return False
        if self.subject is not None and self.subject != e.subject:
            return False
        if self.detail_prefix is not None:
            return str(e.detail).startswith(self.detail_prefix)
        return self.detail is None or self.detail == e.detail


@dataclass(frozen=True, slots=True)
class _Target:
    category: Category
    scope: Scope | None
    outcome: Outcome | None
    bounce: BounceType | None
    retry_after: float | None
    site_paced: bool | None
    suspend: float | None


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    codes: tuple[tuple[int, int], ...]
    enhanced: tuple[_EnhPattern, ...]
    except_enhanced: tuple[_EnhPattern, ...]
    phases: frozenset[Phase]
    when: frozenset[Outcome]
    text: re.Pattern[str] | None
    unless: re.Pattern[str] | None
    target: _Target

    def matches(
        self, code: int | None, enh: _Enh | None, phase: Phase | None, klass: Outcome | None, text: str
    ) -> bool:
        # Cheapest tests first; the regexes run last.
        if self.codes and (code is None or not any(lo <= code <= hi for lo, hi in self.codes)):
            return False
        if self.enhanced and (enh is None or not any(p.matches(enh) for p in self.enhanced)):
            return False
        if self.except_enhanced and enh is not None and any(p.matches(enh) for p in self.except_enhanced):
            return False
        if self.phases and phase not in self.phases:
            return False
        if self.when and klass not in self.when:
            return False
        if self.text is not None and self.text.search(text) is None:
            return False
        return self.unless is None or self.unless.search(text) is None


class _RuleError(ConfigError):
    pass


def _err(where: str, msg: str) -> ConfigError:
    return _RuleError(f"classification rules: {where}: {msg}")


def _as_list(where: str, key: str, value: Any) -> list[Any]:
    if isinstance(value, (str, int)):
        return [value]
    if isinstance(value, list):
        return value
    raise _err(where, f"'{key}' must be a string or a list, not {type(value).__name__}")


def _enum(where: str, key: str, enum: type[_E], value: Any) -> _E:
    try:
        return enum(str(value).lower())
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum)
        raise _err(where, f"{key} {value!r} is not one of: {allowed}") from None


def _seconds(where: str, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _err(where, f"'{key}' must be a non-negative number of seconds, not {value!r}")
    return float(value)


def _parse_codes(where: str, value: Any) -> tuple[tuple[int, int], ...]:
    out = []
    for item in _as_list(where, "codes", value):
        s = str(item).strip()
        m = _CODE_SPEC.match(s)
        if m is None:
            raise _err(where, f"bad reply code pattern {item!r} (use 550, 5xx, 55x is not allowed, or 550-554)")
        if m.group(3):
            lo, hi = int(m.group(3)), int(m.group(4))
            if lo > hi:
                raise _err(where, f"bad reply code range {item!r}")
            out.append((lo, hi))
        elif m.group(2).lower() == "xx":
            base = int(m.group(1)) * 100
            out.append((base, base + 99))
        else:
            out.append((int(s), int(s)))
    return tuple(out)


def _parse_enh_patterns(where: str, value: Any, key: str = "enhanced") -> tuple[_EnhPattern, ...]:
    out = []
    for item in _as_list(where, key, value):
        s = str(item).strip()
        m = _ENH_SPEC.match(s)
        if m is None:
            raise _err(where, f"bad {key} pattern {item!r} (use 5.7.26, x.2.2, 4.7.* or x.7.60*)")
        c, sub, det = m.groups()
        prefix = det[:-1] if det.endswith("*") and det != "*" else None
        out.append(
            _EnhPattern(
                None if c in "x*X" else int(c),
                None if sub == "*" else int(sub),
                None if det == "*" or prefix is not None else int(det),
                prefix,
            )
        )
    return tuple(out)


def _compile(where: str, key: str, value: Any) -> re.Pattern[str] | None:
    if value is None:
        return None
    parts = [str(p) for p in _as_list(where, key, value)]
    if not parts:
        return None
    for p in parts:
        try:
            re.compile(p)
        except re.error as exc:
            raise _err(where, f"bad regex in '{key}' {p!r}: {exc}") from None
    # One alternation per rule: a single scan of the text instead of one per pattern.
    return re.compile("|".join(f"(?:{p})" for p in parts), re.IGNORECASE)


def _target(where: str, raw: Mapping[str, Any], *, need_category: bool = True) -> _Target:
    if "category" not in raw and need_category:
        raise _err(where, "missing 'category'")
    site_paced = raw.get("site_paced")
    if site_paced is not None and not isinstance(site_paced, bool):
        raise _err(where, f"'site_paced' must be true or false, not {site_paced!r}")
    return _Target(
        category=_enum(where, "category", Category, raw.get("category", "unknown")),
        scope=_enum(where, "scope", Scope, raw["scope"]) if "scope" in raw else None,
        outcome=_enum(where, "outcome", Outcome, raw["outcome"]) if "outcome" in raw else None,
        bounce=_enum(where, "bounce", BounceType, raw["bounce"]) if "bounce" in raw else None,
        retry_after=_seconds(where, "retry_after", raw.get("retry_after")),
        site_paced=site_paced,
        suspend=_seconds(where, "suspend", raw.get("suspend")),
    )


def _parse_rule(index: int, raw: Any) -> _Rule | str:
    """A compiled rule, or the name of a rule to disable."""
    if not isinstance(raw, Mapping):
        raise _err(f"rule #{index + 1}", "must be a table")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _err(f"rule #{index + 1}", "missing 'name' (every rule needs a unique name)")
    where = f"rule #{index + 1} '{name}'"
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise _err(where, f"unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_RULE_KEYS))}")
    if raw.get("disable") is True:
        return name
    if not any(k in raw for k in _MATCH_KEYS if k != "unless"):
        raise _err(where, "has no matcher (codes, enhanced, phase, when or text); it would match everything")
    phases = set()
    for p in _as_list(where, "phase", raw.get("phase", [])):
        ph = Phase.parse(str(p))
        if ph is None:
            raise _err(where, f"phase {p!r} is not one of: {', '.join(m.value for m in Phase)}")
        phases.add(ph)
    when = frozenset(_enum(where, "when", Outcome, w) for w in _as_list(where, "when", raw.get("when", [])))
    return _Rule(
        name=name,
        codes=_parse_codes(where, raw["codes"]) if "codes" in raw else (),
        enhanced=_parse_enh_patterns(where, raw["enhanced"]) if "enhanced" in raw else (),
        except_enhanced=(
            _parse_enh_patterns(where, raw["except_enhanced"], "except_enhanced") if "except_enhanced" in raw else ()
        ),
        phases=frozenset(phases),
        when=when,
        text=_compile(where, "text", raw.get("text")),
        unless=_compile(where, "unless", raw.get("unless")),
        target=_target(where, raw),
    )


@dataclass(frozen=True, slots=True)
class _CategoryDefaults:
    scope: Scope
    retry_after: float | None
    site_paced: bool
    suspend: float | None


def _load_toml(source: str | Mapping[str, Any], origin: str) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    try:
        return tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"classification rules ({origin}): not valid TOML: {exc}") from None


@lru_cache(maxsize=1)
def _builtin_rules() -> Mapping[str, Any]:
    text = resources.files("fastmta.feedback").joinpath("classify_rules.toml").read_text("utf-8")
    return _load_toml(text, "built-in classify_rules.toml")


# --------------------------------------------------------------------------
# Extracting code / enhanced code / phase from free text (DSN Diagnostic-Code)

_TEXT_CODE_ENH = re.compile(r"(?<![\w.])([245]\d\d)[ \-,:]+#?([245]\.\d{1,3}\.\d{1,3})(?![\w.])")
_TEXT_ENH = re.compile(r"(?<![\w.])#?([245]\.\d{1,3}\.\d{1,3})(?![\w.])")
_TEXT_CODE = re.compile(r"(?:^|:\s+|said:?\s*|returned\W*|error:?\s*|<<<\s*)#?([245]\d\d)(?=[ \-,:]|$)", re.IGNORECASE)
# Bounce prose that states the verdict when no code does (Gmail, Exchange, qmail).
_TEXT_PERMANENT = re.compile(r"failed permanently|permanent (failure|error)|will not (be )?retr|not going to try again", re.IGNORECASE)
_TEXT_TRANSIENT = re.compile(r"temporary failure|has been delayed|will be retried|will retry|will-retry-until", re.IGNORECASE)
# Postfix "in reply to RCPT TO command", Exim "after RCPT TO:", qmail-ish
# "did not like our RCPT TO", "... for TEXT command", "after end of data".
_TEXT_PHASE = re.compile(
    r"in reply to (?:the )?(?P<a>MAIL FROM|RCPT TO|end of DATA|DATA|HELO|EHLO|STARTTLS|AUTH)"
    r"|(?:after|our|following) (?P<b>MAIL FROM|RCPT TO|end of data|final DATA|DATA|initial connection)"
    r"|(?P<c>refused to talk to me)|for (?P<d>TEXT|RCPT|MAIL|DATA) command"
    r"|while performing the (?P<e>HELO|EHLO) handshake",
    re.IGNORECASE,
)


def outcome_from_prose(text: str) -> Outcome | None:
    """The verdict a bounce's prose states ("failed permanently", "will be retried")."""
    if _TEXT_PERMANENT.search(text):
        return Outcome.PERMANENT
    if _TEXT_TRANSIENT.search(text):
        return Outcome.TRANSIENT
    return None


def parse_diagnostic(text: str) -> tuple[int | None, str | None, Phase | None]:
    """Best-effort (reply code, enhanced code, phase) found inside free text."""
    code: int | None = None
    enhanced: str | None = None
    m = _TEXT_CODE_ENH.search(text)
    if m is not None:
        code, enhanced = int(m.group(1)), m.group(2)
    else:
        m2 = _TEXT_ENH.search(text)
        if m2 is not None:
            enhanced = m2.group(1)
        m3 = _TEXT_CODE.search(text)
        if m3 is not None:
            code = int(m3.group(1))
    phase: Phase | None = None
    mp = _TEXT_PHASE.search(text)
    if mp is not None:
        if mp.group("c"):
            phase = Phase.CONNECT
        else:
            word = next(g for g in mp.groups() if g)
            phase = Phase.parse(word)
            if phase is Phase.DATA and mp.group("a") is None:
                # "final DATA", "for DATA command" in bounce prose mean the message.
                phase = Phase.EOD
    return code, enhanced, phase


# --------------------------------------------------------------------------
# Text normalisation

# Addresses and URL paths carry words that are not the server's verdict
# (<filtered@example.com>, https://.../reason/#spam); matching them would
# misclassify. URL hosts stay: they name the filter vendor. Normalising also
# makes one site's replies to different recipients share a cache entry.
_URL = re.compile(r"\bhttps?://([^/\s'\"<>]+)[^\s'\"<>]*", re.IGNORECASE)
_ADDR = re.compile(r"[^\s<>()\[\]\"':;,]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*")
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The text rules see: URL paths and mail addresses removed, spaces folded."""
    if "@" in text:
        text = _ADDR.sub("~", text)
    if "://" in text:
        text = _URL.sub(r"\1", text)
    return _SPACE.sub(" ", text).strip()


# --------------------------------------------------------------------------
# The classifier


_CacheKey = tuple[int | None, str | None, Phase | None, Outcome | None, str]


class Classifier:
    """Ordered rules -> :class:`Classification`. Immutable once built; thread-safe reads."""

    CACHE_SIZE = 8192

    def __init__(
        self,
        rules: Iterable[_Rule],
        categories: Mapping[Category, _CategoryDefaults],
        local: Mapping[LocalFailure, _Target],
        hard_categories: frozenset[Category],
    ) -> None:
        self._rules = tuple(rules)
        self._categories = dict(categories)
        self._local = dict(local)
        self._hard = hard_categories
        self._cache: OrderedDict[_CacheKey, Classification] = OrderedDict()

    # -- construction ---------------------------------------------------

    @classmethod
    def default(cls) -> Classifier:
        """The built-in rules only (shared instance)."""
        return default_classifier()

    @classmethod
    def from_rules(
        cls, extra: str | Mapping[str, Any] | None = None, *, origin: str = "user rules"
    ) -> Classifier:
        """Built-in rules extended/overridden by *extra* (TOML text or an already parsed dict).

        In *extra*: a ``[[rule]]`` whose name matches a built-in rule replaces
        it in place; ``disable = true`` removes it; new rules go before all
        built-in ones (the user's word wins). ``[categories.X]``, ``[local.Y]``
        and ``hard_categories`` override the defaults key by key;
        ``replace_builtin = true`` drops the built-in rule list entirely.
        Raises ``ConfigError`` naming the offending rule.
        """
        base = _builtin_rules()
        user = _load_toml(extra, origin) if extra is not None else {}
        for doc, label in ((base, "built-in"), (user, origin)):
            unknown = set(doc) - _TOP_KEYS
            if unknown:
                raise ConfigError(
                    f"classification rules ({label}): unknown top-level key(s) {', '.join(sorted(unknown))}; "
                    f"allowed: {', '.join(sorted(_TOP_KEYS))}"
                )
        builtin = [] if user.get("replace_builtin") is True else cls._rules_of(base, "built-in")
        own = cls._rules_of(user, origin)
        names = {r.name: i for i, r in enumerate(builtin) if isinstance(r, _Rule)}
        front: list[_Rule] = []
        disabled: set[str] = set()
        seen: set[str] = set()
        for r in own:
            name = r if isinstance(r, str) else r.name
            if name in seen:
                raise ConfigError(f"classification rules ({origin}): rule '{name}' defined twice")
            seen.add(name)
            if isinstance(r, str):
                if r not in names:
                    raise ConfigError(f"classification rules ({origin}): cannot disable unknown rule '{r}'")
                disabled.add(r)
            elif r.name in names:
                builtin[names[r.name]] = r
            else:
                front.append(r)
        rules = front + [r for r in builtin if isinstance(r, _Rule) and r.name not in disabled]
        categories = cls._categories_of(base, user, origin)
        local = cls._local_of(base, user, origin)
        hard_raw = user.get("hard_categories", base.get("hard_categories", []))
        hard = frozenset(
            _enum("hard_categories", "category", Category, c) for c in _as_list("hard_categories", "hard_categories", hard_raw)
        )
        return cls(rules, categories, local, hard)

    @staticmethod
    def _rules_of(doc: Mapping[str, Any], origin: str) -> list[_Rule | str]:
        raw = doc.get("rule", [])
        if not isinstance(raw, list):
            raise ConfigError(f"classification rules ({origin}): 'rule' must be an array of tables ([[rule]])")
        out: list[_Rule | str] = []
        names: set[str] = set()
        for i, item in enumerate(raw):
            try:
                r = _parse_rule(i, item)
            except _RuleError as exc:
                raise ConfigError(f"{exc} [{origin}]") from None
            name = r if isinstance(r, str) else r.name
            if name in names:
                raise ConfigError(f"classification rules ({origin}): rule '{name}' defined twice")
            names.add(name)
            out.append(r)
        return out

    @staticmethod
    def _categories_of(
        base: Mapping[str, Any], user: Mapping[str, Any], origin: str
    ) -> dict[Category, _CategoryDefaults]:
        merged: dict[str, dict[str, Any]] = {}
        for doc, label in ((base, "built-in"), (user, origin)):
            table = doc.get("categories", {})
            if not isinstance(table, Mapping):
                raise ConfigError(f"classification rules ({label}): [categories] must be a table")
            for key, val in table.items():
                where = f"[categories.{key}] ({label})"
                _enum(where, "category", Category, key)
                if not isinstance(val, Mapping):
                    raise _err(where, "must be a table")
                bad = set(val) - _CATEGORY_KEYS
                if bad:
                    raise _err(where, f"unknown key(s) {', '.join(sorted(bad))}")
                merged.setdefault(key, {}).update(val)
        out: dict[Category, _CategoryDefaults] = {}
        for cat in Category:
            val = merged.get(cat.value, {})
            where = f"[categories.{cat.value}]"
            paced = val.get("site_paced", False)
            if not isinstance(paced, bool):
                raise _err(where, f"'site_paced' must be true or false, not {paced!r}")
            out[cat] = _CategoryDefaults(
                scope=_enum(where, "scope", Scope, val.get("scope", "recipient")),
                retry_after=_seconds(where, "retry_after", val.get("retry_after")),
                site_paced=paced,
                suspend=_seconds(where, "suspend", val.get("suspend")),
            )
        return out

    @staticmethod
    def _local_of(base: Mapping[str, Any], user: Mapping[str, Any], origin: str) -> dict[LocalFailure, _Target]:
        merged: dict[str, dict[str, Any]] = {}
        for doc, label in ((base, "built-in"), (user, origin)):
            table = doc.get("local", {})
            if not isinstance(table, Mapping):
                raise ConfigError(f"classification rules ({label}): [local] must be a table")
            for key, val in table.items():
                where = f"[local.{key}] ({label})"
                _enum(where, "local failure", LocalFailure, key)
                if not isinstance(val, Mapping):
                    raise _err(where, "must be a table")
                bad = set(val) - _LOCAL_KEYS
                if bad:
                    raise _err(where, f"unknown key(s) {', '.join(sorted(bad))}")
                merged.setdefault(key, {}).update(val)
        out: dict[LocalFailure, _Target] = {}
        for kind in LocalFailure:
            val = merged.get(kind.value)
            if val is None:
                raise ConfigError(f"classification rules: [local.{kind.value}] is missing")
            where = f"[local.{kind.value}]"
            if "outcome" not in val:
                raise _err(where, "missing 'outcome'")
            out[kind] = _target(where, val)
        return out

    # -- classification -------------------------------------------------

    @property
    def rule_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self._rules)

    def classify(self, reply: Reply, phase: Phase | str | None = None) -> Classification:
        """Classify a reply the SMTP client received, answering *phase*."""
        enhanced = reply.enhanced
        text = " ".join(reply.lines)
        if enhanced is None:
            # Some servers put the enhanced code after a "#" or on a later line.
            m = _TEXT_ENH.search(text)
            if m is not None and m.group(1)[0] == str(reply.code)[0]:
                enhanced = m.group(1)
        return self.classify_parts(reply.code, enhanced, text, phase)

    def classify_text(
        self,
        text: str,
        *,
        code: int | None = None,
        enhanced: str | None = None,
        phase: Phase | str | None = None,
        outcome: Outcome | None = None,
    ) -> Classification:
        """Classify a diagnostic text (e.g. a DSN's Diagnostic-Code).

        Given values (a DSN's Status, its Action as *outcome*) win; what is
        missing is looked for in the text itself.
        """
        if code is None or enhanced is None or phase is None:
            t_code, t_enh, t_phase = parse_diagnostic(text)
            code = code if code is not None else t_code
            enhanced = enhanced if enhanced is not None else t_enh
            phase = phase if phase is not None else t_phase
        if outcome is None and code is None and enhanced is None:
            outcome = outcome_from_prose(text)
        return self.classify_parts(code, enhanced, text, phase, outcome=outcome)

    def classify_parts(
        self,
        code: int | None,
        enhanced: str | None,
        text: str,
        phase: Phase | str | None = None,
        *,
        outcome: Outcome | None = None,
    ) -> Classification:
        """Classify from the pieces: reply code, enhanced code, text, phase."""
        ph = Phase.parse(phase) if phase is not None else None
        text = normalize_text(text)
        key: _CacheKey = (code, enhanced, ph, outcome, text)
        cache = self._cache
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
        result = self._decide(code, _parse_enhanced(enhanced), ph, outcome, text)
        cache[key] = result
        if len(cache) > self.CACHE_SIZE:
            cache.popitem(last=False)
        return result

    def classify_local(self, kind: LocalFailure | str, detail: str = "") -> Classification:
        """Classify a failure that happened locally (DNS, connect, TLS, timeout...).

        *detail* is for the caller's logs; the table decides, not the text.
        """
        try:
            k = LocalFailure(kind)
        except ValueError:
            allowed = ", ".join(m.value for m in LocalFailure)
            raise ValueError(f"unknown local failure {kind!r}; one of: {allowed}") from None
        t = self._local[k]
        assert t.outcome is not None  # enforced when loading
        return self._build(t.outcome, t, f"local:{k.value}")

    def _decide(
        self, code: int | None, enh: _Enh | None, phase: Phase | None, forced: Outcome | None, text: str
    ) -> Classification:
        klass = forced or _outcome_of(code, enh)
        for rule in self._rules:
            if rule.matches(code, enh, phase, klass, text):
                t = rule.target
                outcome = t.outcome or klass or Outcome.PERMANENT
                return self._build(outcome, t, rule.name, phase)
        fallback = _Target(Category.UNKNOWN, None, None, None, None, None, None)
        return self._build(klass or Outcome.PERMANENT, fallback, "default", phase)

    def _build(self, outcome: Outcome, t: _Target, rule: str, phase: Phase | None = None) -> Classification:
        cat = t.category
        if outcome is Outcome.DELIVERED:
            return Classification(outcome, Category.DELIVERED, BounceType.NONE, Scope.RECIPIENT, rule=rule)
        d = self._categories[cat]
        scope = t.scope or d.scope
        if phase in _SITE_PHASES and scope in (Scope.RECIPIENT, Scope.MESSAGE):
            # Refused before any envelope: nothing recipient-specific was said.
            scope = Scope.SITE
        if t.bounce is not None:
            bounce = t.bounce
        elif outcome is Outcome.PERMANENT and cat in self._hard:
            bounce = BounceType.HARD
        else:
            bounce = BounceType.SOFT
        return Classification(
            outcome=outcome,
            category=cat,
            bounce=bounce,
            scope=scope,
            retry_after=None if outcome is Outcome.PERMANENT else (t.retry_after if t.retry_after is not None else d.retry_after),
            site_paced=t.site_paced if t.site_paced is not None else d.site_paced,
            suspend_for=t.suspend if t.suspend is not None else d.suspend,
            rule=rule,
        )


_SITE_PHASES = frozenset({Phase.CONNECT, Phase.EHLO, Phase.HELO})


def _outcome_of(code: int | None, enh: _Enh | None) -> Outcome | None:
    # The reply code wins over the enhanced code when they disagree: it is
    # what the SMTP state machine acted on ("554 4.4.7 expired" is final).
    cls = code // 100 if code is not None else (enh.cls if enh is not None else None)
    if cls is None:
        return None
    if cls in (2, 3):
        return Outcome.DELIVERED
    return Outcome.TRANSIENT if cls == 4 else Outcome.PERMANENT


@lru_cache(maxsize=1)
def default_classifier() -> Classifier:
    """The shared classifier with the built-in rules."""
    return Classifier.from_rules(None, origin="built-in")


def classify(reply: Reply, phase: Phase | str | None = None) -> Classification:
    """Classify *reply* with the built-in rules."""
    return default_classifier().classify(reply, phase)


def classify_local(kind: LocalFailure | str, detail: str = "") -> Classification:
    """Classify a local failure with the built-in table."""
    return default_classifier().classify_local(kind, detail)
