"""Reply classification: SMTP reply or local failure -> what it means.

Everything downstream (retries, throttle, suppression, accounting) asks one
question of a failed attempt: *what happened, to whom does it apply, and
when is it worth trying again?* The :class:`Classifier` answers it with a
:class:`~fastmta.feedback.classification.Classification` by applying the
ordered rules of ``classify_rules.toml`` (loaded, checked and compiled by
:mod:`fastmta.feedback.rules`) over reply code, RFC 3463 enhanced code, SMTP
phase and text, so operators can extend or override them from their
configuration without touching code (:meth:`Classifier.from_rules`).

How the outcome is settled when the codes disagree (the rule file's header
says the same to operators): the reply code's class decides, being what
the SMTP state machine acted on ("554 4.4.7" is final, "451 5.7.1" is
retried); without one, the enhanced code's class; without either, the
prose's verdict; a DSN's Action wins over all. The enhanced code still
picks the category when its class disagrees. Unless a rule forces the
outcome, two corrections follow RFC 5321 and practice: 552 in reply to RCPT
is transient (RFC 5321 4.5.3.1.10) unless the reply condemns the address
itself, and a permanent rate-limit reply (some providers use 5xx for
sending quotas) is retried rather than bounced. Finally, whatever a rule or
table says, a category in :data:`~fastmta.feedback.rules.NEVER_HARD` is
never a hard bounce: a block of us must not become a bad address of theirs.

Hot-path notes: the rules arrive compiled, and results are memoised per
(code, enhanced, phase, text) in a bounded cache, because a throttled site
answers thousands of recipients with the same reply.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from fastmta.errors import Scope
from fastmta.feedback.classification import BounceType, Category, Classification, LocalFailure, Outcome, Phase
from fastmta.feedback.diagnostic import enhanced_in_text, normalize_text, outcome_from_prose, parse_diagnostic
from fastmta.feedback.rules import NEVER_HARD, CategoryDefaults, EnhancedCode, Rule, Target, load_rules, parse_enhanced
from fastmta.smtp.reply import Reply

__all__ = ["MAX_TEXT", "Classifier", "classify", "classify_local", "default_classifier"]

#: What of a reply or diagnostic the rules read: the first 4,096 characters. Every reply
#: seen in the corpora says what it means well within that; a longer one (a hostile server's
#: 2 MB of multi-line reply, a bounce quoting a whole message as its diagnostic) cost
#: classification time in proportion, ~6 µs a character, inside the delivery path.
MAX_TEXT = 4096


_CacheKey = tuple[int | None, str | None, Phase | None, Outcome | None, str]


class Classifier:
    """Ordered rules -> :class:`Classification`. Immutable once built; thread-safe reads."""

    CACHE_SIZE = 8192

    def __init__(
        self,
        rules: Iterable[Rule],
        categories: Mapping[Category, CategoryDefaults],
        local: Mapping[LocalFailure, Target],
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
        rules = load_rules(extra, origin=origin)
        return cls(rules.rules, rules.categories, rules.local, rules.hard_categories)

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
            found = enhanced_in_text(text)
            if found is not None and found[0] == str(reply.code)[0]:
                enhanced = found
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
        text = text[:MAX_TEXT]
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
        text = normalize_text(text[:MAX_TEXT])
        key: _CacheKey = (code, enhanced, ph, outcome, text)
        cache = self._cache
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
        result = self._decide(code, parse_enhanced(enhanced), ph, outcome, text)
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
        self, code: int | None, enh: EnhancedCode | None, phase: Phase | None, forced: Outcome | None, text: str
    ) -> Classification:
        klass = forced or _outcome_of(code, enh)
        for rule in self._rules:
            if rule.matches(code, enh, phase, klass, text):
                t = rule.target
                outcome = t.outcome or klass or Outcome.PERMANENT
                if t.outcome is None and forced is None and outcome is Outcome.PERMANENT:
                    outcome = self._settle(t.category, code, phase)
                return self._build(outcome, t, rule.name, phase)
        fallback = Target(Category.UNKNOWN, None, None, None, None, None, None)
        return self._build(klass or Outcome.PERMANENT, fallback, "default", phase)

    def _settle(self, cat: Category, code: int | None, phase: Phase | None) -> Outcome:
        """A permanent outcome from the codes, corrected where the codes overstate it."""
        if cat in _RETRY_WHEN_PERMANENT:
            return Outcome.TRANSIENT  # "550 5.4.5 Daily sending quota exceeded": wait, then retry
        if code == 552 and phase is Phase.RCPT and cat not in self._hard and cat is not Category.INACTIVE_MAILBOX:
            return Outcome.TRANSIENT  # RFC 5321 4.5.3.1.10; RFC 3463 X.2.2 "persistent transient"
        return Outcome.PERMANENT

    def _build(self, outcome: Outcome, t: Target, rule: str, phase: Phase | None = None) -> Classification:
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
        if bounce is BounceType.HARD and (cat in NEVER_HARD or outcome is not Outcome.PERMANENT):
            # The invariant, checked after every decision (the loader refuses
            # rules that would break it; a Classifier built by hand may not).
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
#: Categories whose permanent replies are still worth a later try.
_RETRY_WHEN_PERMANENT = frozenset({Category.RATE_LIMITED, Category.GREYLISTED})


def _outcome_of(code: int | None, enh: EnhancedCode | None) -> Outcome | None:
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
