"""The rule file of reply classification: loading, validation and compilation.

``classify_rules.toml`` (shipped in this package) holds ordered rules over
reply code, RFC 3463 enhanced code, SMTP phase and text, the per-category
defaults and the table of local failures. This module reads it, merges an
operator's own rules into it, checks every key and value (a
``ConfigError`` names the offending rule) and compiles the result into
matchers: a :class:`RuleSet`, which :class:`fastmta.feedback.classify.Classifier`
applies. Regexes are compiled here, once, so the hot path never does.

Text matchers are negation-aware: a phrase right after a negation ("is not
blacklisted", "not listed in", "no virus found") does not count, so a reply
that denies a reason is not read as stating it. :data:`NEVER_HARD` names the
categories that may never be a hard bounce; the loader refuses rules and
tables that would make one.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from importlib import resources
from typing import Any, TypeVar

from fastmta.errors import ConfigError, Scope
from fastmta.feedback.classification import BounceType, Category, LocalFailure, Outcome, Phase

__all__ = [
    "NEVER_HARD",
    "CategoryDefaults",
    "EnhancedCode",
    "Rule",
    "RuleSet",
    "Target",
    "load_rules",
    "parse_enhanced",
]


_E = TypeVar("_E", bound=Enum)


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

#: Categories that speak of the sender, the message or the path (a block of
#: us, an authentication or policy verdict, a rate limit, a filter, the
#: far end's or the network's trouble), never of the recipient's address:
#: whatever the code says, they are never a hard bounce (suppression).
NEVER_HARD: frozenset[Category] = frozenset(
    {
        Category.REPUTATION_BLOCK, Category.AUTH_FAILURE, Category.POLICY, Category.RATE_LIMITED,
        Category.GREYLISTED, Category.SPAM_OR_VIRUS, Category.CONTENT_FILTERED, Category.MESSAGE_FORMAT,
        Category.MESSAGE_TOO_LARGE, Category.RELAY_DENIED, Category.SENDER_REJECTED,
        Category.REMOTE_SYSTEM, Category.NETWORK, Category.PROTOCOL_ERROR, Category.EXPIRED,
    }
)  # fmt: skip

_CODE_SPEC = re.compile(r"^([2-5])(xx|\d\d)$|^([2-5]\d\d)-([2-5]\d\d)$", re.IGNORECASE)
_ENH_SPEC = re.compile(r"^([245x*])\.(\d{1,3}|\*)\.(\d{1,3}\*?|\*)$", re.IGNORECASE)


# --------------------------------------------------------------------------
# Compiled rules: what the classifier matches with


@dataclass(frozen=True, slots=True)
class EnhancedCode:
    """A parsed enhanced status code: class, subject, detail."""

    cls: int
    subject: int
    detail: int


def parse_enhanced(value: str | None) -> EnhancedCode | None:
    """*value* ("5.7.1", "#5.7.1") parsed; None when absent or not a valid class 2, 4 or 5 code."""
    if not value:
        return None
    parts = value.strip().lstrip("#").split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    cls, subject, detail = (int(p) for p in parts)
    if cls not in (2, 4, 5):
        return None
    return EnhancedCode(cls, subject, detail)


@dataclass(frozen=True, slots=True)
class _EnhPattern:
    cls: int | None
    subject: int | None
    detail: int | None
    detail_prefix: str | None  # "60*" matches 600-609, 6000..., not 60 (Exchange's 5.7.60 is not 5.7.6xx)

    def matches(self, e: EnhancedCode) -> bool:
        if self.cls is not None and self.cls != e.cls:
            return False
        if self.subject is not None and self.subject != e.subject:
            return False
        if self.detail_prefix is not None:
            detail = str(e.detail)
            return len(detail) > len(self.detail_prefix) and detail.startswith(self.detail_prefix)
        return self.detail is None or self.detail == e.detail


# A negation just before a phrase: "not", "never", "no", "...n't", then at
# most two filler words ("is not currently listed in", "not on any
# blacklist", "not found in"). Searched in a short window ending where the
# phrase starts, so "not delivered because: spam" still counts as spam.
_NEGATION = re.compile(
    r"(?:\b(?:not|never|no)|n't)\W+"
    r"(?:(?:be|been|being|currently|yet|ever|on|in|at|a|an|the|any|our|your|its|found|listed|detected|seen)\W+){0,2}$",
    re.IGNORECASE,
)
_NEGATION_WINDOW = 48


def affirmed(pattern: re.Pattern[str], text: str) -> bool:
    """Whether *pattern* occurs in *text* other than right after a negation."""
    pos = 0
    while True:
        m = pattern.search(text, pos)
        if m is None:
            return False
        start = m.start()
        if _NEGATION.search(text, max(0, start - _NEGATION_WINDOW), start) is None:
            return True
        pos = start + 1


@dataclass(frozen=True, slots=True)
class Target:
    """What a rule (or a local-failure entry) assigns; None: the category's default decides."""

    category: Category
    scope: Scope | None
    outcome: Outcome | None
    bounce: BounceType | None
    retry_after: float | None
    site_paced: bool | None
    suspend: float | None


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule: its matchers (all given ones must match) and its target."""

    name: str
    codes: tuple[tuple[int, int], ...]
    enhanced: tuple[_EnhPattern, ...]
    except_enhanced: tuple[_EnhPattern, ...]
    phases: frozenset[Phase]
    when: frozenset[Outcome]
    text: re.Pattern[str] | None
    unless: re.Pattern[str] | None
    target: Target

    def matches(
        self, code: int | None, enh: EnhancedCode | None, phase: Phase | None, klass: Outcome | None, text: str
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
        if self.text is not None and not affirmed(self.text, text):
            return False
        return self.unless is None or self.unless.search(text) is None


# --------------------------------------------------------------------------
# Checking the raw TOML values and compiling them


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


def _target(where: str, raw: Mapping[str, Any], *, need_category: bool = True) -> Target:
    if "category" not in raw and need_category:
        raise _err(where, "missing 'category'")
    site_paced = raw.get("site_paced")
    if site_paced is not None and not isinstance(site_paced, bool):
        raise _err(where, f"'site_paced' must be true or false, not {site_paced!r}")
    category = _enum(where, "category", Category, raw.get("category", "unknown"))
    bounce = _enum(where, "bounce", BounceType, raw["bounce"]) if "bounce" in raw else None
    if bounce is BounceType.HARD and category in NEVER_HARD:
        raise _err(where, f"bounce 'hard' is not allowed for category {category.value!r}: it is never the address's fault")
    return Target(
        category=category,
        scope=_enum(where, "scope", Scope, raw["scope"]) if "scope" in raw else None,
        outcome=_enum(where, "outcome", Outcome, raw["outcome"]) if "outcome" in raw else None,
        bounce=bounce,
        retry_after=_seconds(where, "retry_after", raw.get("retry_after")),
        site_paced=site_paced,
        suspend=_seconds(where, "suspend", raw.get("suspend")),
    )


def _parse_rule(index: int, raw: Any) -> Rule | str:
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
    return Rule(
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
class CategoryDefaults:
    """A category's scope and timing, for what a matching rule leaves unsaid."""

    scope: Scope
    retry_after: float | None
    site_paced: bool
    suspend: float | None


# --------------------------------------------------------------------------
# Reading the rule file (the built-in one ships inside this package)


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
# Merging the built-in file with the operator's rules


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The compiled rules, in the order they are tried, with the tables they fall back on."""

    rules: tuple[Rule, ...]
    categories: Mapping[Category, CategoryDefaults]
    local: Mapping[LocalFailure, Target]
    hard_categories: frozenset[Category]


def load_rules(extra: str | Mapping[str, Any] | None = None, *, origin: str = "user rules") -> RuleSet:
    """The built-in rules merged with *extra* (TOML text or an already parsed dict), checked and compiled.

    How *extra* extends or overrides the built-in file: see
    :meth:`fastmta.feedback.classify.Classifier.from_rules`. Raises
    ``ConfigError`` naming the offending rule.
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
    builtin = [] if user.get("replace_builtin") is True else _rules_of(base, "built-in")
    own = _rules_of(user, origin)
    names = {r.name: i for i, r in enumerate(builtin) if isinstance(r, Rule)}
    front: list[Rule] = []
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
    rules = front + [r for r in builtin if isinstance(r, Rule) and r.name not in disabled]
    categories = _categories_of(base, user, origin)
    local = _local_of(base, user, origin)
    hard_raw = user.get("hard_categories", base.get("hard_categories", []))
    hard = frozenset(
        _enum("hard_categories", "category", Category, c) for c in _as_list("hard_categories", "hard_categories", hard_raw)
    )
    never = sorted(c.value for c in hard & NEVER_HARD)
    if never:
        raise ConfigError(
            f"classification rules ({origin}): hard_categories may not include {', '.join(never)}: "
            "a block, filter, policy, rate or infrastructure reply is never the address's fault"
        )
    return RuleSet(tuple(rules), categories, local, hard)


def _rules_of(doc: Mapping[str, Any], origin: str) -> list[Rule | str]:
    raw = doc.get("rule", [])
    if not isinstance(raw, list):
        raise ConfigError(f"classification rules ({origin}): 'rule' must be an array of tables ([[rule]])")
    out: list[Rule | str] = []
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


def _categories_of(
    base: Mapping[str, Any], user: Mapping[str, Any], origin: str
) -> dict[Category, CategoryDefaults]:
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
    out: dict[Category, CategoryDefaults] = {}
    for cat in Category:
        val = merged.get(cat.value, {})
        where = f"[categories.{cat.value}]"
        paced = val.get("site_paced", False)
        if not isinstance(paced, bool):
            raise _err(where, f"'site_paced' must be true or false, not {paced!r}")
        out[cat] = CategoryDefaults(
            scope=_enum(where, "scope", Scope, val.get("scope", "recipient")),
            retry_after=_seconds(where, "retry_after", val.get("retry_after")),
            site_paced=paced,
            suspend=_seconds(where, "suspend", val.get("suspend")),
        )
    return out


def _local_of(base: Mapping[str, Any], user: Mapping[str, Any], origin: str) -> dict[LocalFailure, Target]:
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
    out: dict[LocalFailure, Target] = {}
    for kind in LocalFailure:
        val = merged.get(kind.value)
        if val is None:
            raise ConfigError(f"classification rules: [local.{kind.value}] is missing")
        where = f"[local.{kind.value}]"
        if "outcome" not in val:
            raise _err(where, "missing 'outcome'")
        out[kind] = _target(where, val)
    return out
