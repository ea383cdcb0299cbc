"""Reading a reply's free text: the codes, phase and verdict written in it, and the text rules see.

A DSN's Diagnostic-Code (or a reply whose enhanced code is not where RFC 2034
puts it) carries the reply code, the enhanced status code and the SMTP step
inside prose written by another MTA; bounce prose may state the verdict
("failed permanently") with no code at all. This module digs those out, and
normalises the text the classification rules match against.
"""

from __future__ import annotations

import re

from fastmta.feedback.classification import Outcome, Phase

__all__ = ["enhanced_in_text", "normalize_text", "outcome_from_prose", "parse_diagnostic"]


# --------------------------------------------------------------------------
# Extracting code / enhanced code / phase from free text (DSN Diagnostic-Code)

_TEXT_CODE_ENH = re.compile(r"(?<![\w.])([245]\d\d)[ \-,:]+#?([245]\.\d{1,3}\.\d{1,3})(?![\w.])")
_TEXT_ENH = re.compile(r"(?<![\w.])#?([245]\.\d{1,3}\.\d{1,3})(?![\w.])")
_TEXT_CODE = re.compile(r"(?:^|:\s+|said:?\s*|returned\W*|error:?\s*|<<<\s*)#?([245]\d\d)(?=[ \-,:]|$)", re.IGNORECASE)
# Bounce prose that states the verdict when no code does (Gmail, Exchange, qmail).
_TEXT_PERMANENT = re.compile(r"failed permanently|permanent (failure|error)|will not (be )?retr|not going to try again", re.IGNORECASE)
_TEXT_TRANSIENT = re.compile(r"temporary failure|has been delayed|will be retried|will retry|will-retry-until", re.IGNORECASE)
# Postfix "in reply to RCPT TO command", Exim "after RCPT TO:", qmail-ish
# "did not like our RCPT TO" and "failed after I sent the message" (the
# reply to the end of data), "... for TEXT command", "after end of data".
_TEXT_PHASE = re.compile(
    r"in reply to (?:the )?(?P<a>MAIL FROM|RCPT TO|end of DATA|DATA|HELO|EHLO|STARTTLS|AUTH)"
    r"|(?:after|our|following) (?P<b>MAIL FROM|RCPT TO|end of data|final DATA|DATA|initial connection)"
    r"|(?P<c>refused to talk to me)|for (?P<d>TEXT|RCPT|MAIL|DATA) command"
    r"|while performing the (?P<e>HELO|EHLO) handshake|(?P<f>failed after I sent the message)",
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
        elif mp.group("f"):
            phase = Phase.EOD
        else:
            word = next(g for g in mp.groups() if g)
            phase = Phase.parse(word)
            if phase is Phase.DATA and mp.group("a") is None:
                # "final DATA", "for DATA command" in bounce prose mean the message.
                phase = Phase.EOD
    return code, enhanced, phase


def enhanced_in_text(text: str) -> str | None:
    """The first enhanced status code written anywhere in *text* ("#5.7.1" too)."""
    m = _TEXT_ENH.search(text)
    return m.group(1) if m is not None else None


# --------------------------------------------------------------------------
# Text normalisation

# Addresses and URL paths carry words that are not the server's verdict
# (<filtered@example.com>, https://.../reason/#spam); matching them would
# misclassify. URL hosts stay: they name the filter vendor. Normalising also
# makes one site's replies to different recipients share a cache entry.
_URL = re.compile(r"\bhttps?://([^/\s'\"<>]+)[^\s'\"<>]*", re.IGNORECASE)
# A local part starts where a run of such characters starts (the look-behind) and is taken whole
# (possessive): without both, a long run with no "@" was scanned again from each of its characters,
# quadratic in the text (a 58 KB bounce took 13 s to classify; a hostile reply could stall delivery).
_ADDR = re.compile(r"(?<![^\s<>()\[\]\"':;,@])[^\s<>()\[\]\"':;,@]++@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*")
_SPACE = re.compile(r"\s+")
# A multi-line reply repeats its codes on every line ("552-5.7.0 ... potential
# 552-5.7.0 security issue"); the repeats would split the phrases rules look
# for. The first occurrence stays (rules may test the code in the text).
_CODE_MARK = re.compile(r"(?<![\w.])(?:[245]\d\d[ -])?#?([245]\.\d{1,3}\.\d{1,3})(?![\w.])")


def _drop_repeated_codes(text: str) -> str:
    first: list[str] = []

    def keep_first(m: re.Match[str]) -> str:
        if not first:
            first.append(m.group(1))
            return m.group(0)
        return " " if m.group(1) == first[0] else m.group(0)

    return _CODE_MARK.sub(keep_first, text)


def normalize_text(text: str) -> str:
    """The text rules see: URL paths, mail addresses and repeated line codes removed, spaces folded."""
    if "@" in text:
        text = _ADDR.sub("~", text)
    if "://" in text:
        text = _URL.sub(r"\1", text)
    text = _drop_repeated_codes(text)
    return _SPACE.sub(" ", text).strip()

