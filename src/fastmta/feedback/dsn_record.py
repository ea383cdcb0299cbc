"""The per-recipient record of a bounce, and the one place that builds it.

Every reader (RFC 3464 fields, prose formats, vendor notifications) goes
through :func:`make_recipient`, which holds the rule that keeps a bounce from
ever reading as a delivery: a 2.x.x status or a 2xx reply code is kept only
when the report itself says the message got through (``Action: delivered``,
``relayed``, ``expanded``; Postfix's address-verification ``deliverable``).
Anywhere else such a number is noise (an IP address, a version, a "250 Ok"
from an earlier step of the transcript) and is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastmta.feedback.dsn_codes import codes_in

__all__ = ["FAILURE_ACTIONS", "SUCCESS_ACTIONS", "DSNRecipient", "make_recipient", "refined_status"]

SUCCESS_ACTIONS = frozenset({"delivered", "relayed", "expanded", "deliverable"})
FAILURE_ACTIONS = frozenset({"failed", "delayed", "undeliverable"})
_SUCCESS_REPLY = re.compile(r"\s*2\d\d(?![\d.])")
_STATUS_FIELD = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


@dataclass(frozen=True, slots=True)
class DSNRecipient:
    """What a bounce says about one recipient.

    ``recipient`` is the Final-Recipient (lower-cased), or the Original-Recipient
    when the final one is not a plain mailbox (a source route, a pipe, an
    X.400 name). For prose bounces ``standard`` is False and ``source`` names
    the format family that read it.
    """

    recipient: str
    action: str | None  # failed, delayed, delivered, relayed, expanded (deliverable: Postfix verify)
    status: str | None  # RFC 3463 code: the Status field, or the one written in the prose
    diagnostic: str  # Diagnostic-Code text (or the prose found for it)
    remote_mta: str | None = None
    reply_code: int | None = None
    standard: bool = True  # False when found by a prose reader
    original_recipient: str | None = None
    last_attempt: str | None = None  # Last-Attempt-Date as written
    reporting_mta: str | None = None
    source: str = "rfc3464"  # rfc3464, rfc3464-text (fields written as text), amazonses, or a prose family

    @property
    def success(self) -> bool:
        """True for a success notification (the report says delivered/relayed/expanded)."""
        return self.action in SUCCESS_ACTIONS

    @property
    def status_class(self) -> int | None:
        """2, 4 or 5: from the status, else the reply code, else what the report says (failed 5, delayed 4)."""
        if self.status:
            return int(self.status[0])
        if self.reply_code is not None:
            return self.reply_code // 100
        if self.action in SUCCESS_ACTIONS:
            return 2
        if self.action == "delayed":
            return 4
        if self.action in FAILURE_ACTIONS:
            return 5
        return None


def status_field(value: str | None) -> str | None:
    """The code of a Status field ("5.2.0 (LMTP transmission failure)" -> "5.2.0"), None when malformed."""
    if not value:
        return None
    m = _STATUS_FIELD.match(value)
    return f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}" if m else None


def refined_status(status: str | None, found: str | None) -> str | None:
    """*status* (a Status field's), or the more specific code *found* in the diagnostic.

    A field of X.0.0 says only "failed" or "delayed" (OpenSMTPD writes 5.0.0 or
    4.0.0 whatever the receiver answered), one of X.Y.0 only its subject; the
    receiver's own code of the same class, written in the diagnostic, says why.
    A code of another class stays out: the field's class is the report's
    verdict (a 4xx retried until it expired is a failure).
    """
    if status is None:
        return found
    if found is None or found[0] != status[0] or found == status or found.endswith(".0.0"):
        return status
    if status.endswith(".0.0"):
        return found  # the receiver's X.Y.0 too (OpenSMTPD's 5.0.0 for a 550 5.7.0: a block, not unknown)
    subject = status.split(".")[1]
    if status.endswith(".0") and subject not in ("4", "7") and not found.endswith(".0"):
        # X.Y.0 is "other or undefined" within its subject (Sendmail's 5.5.0 for the receiver's 554 5.7.1):
        # the receiver's code names the cause. X.7.0 stays (a policy verdict: a quoted "5.1.1 user unknown"
        # must not make a block a hard bounce), and X.4.0 (routing trouble says more than a last reply).
        return found
    return status


def normalize_action(value: str | None) -> str | None:
    if not value:
        return None
    word = value.strip().split()[0].strip(";,.()").lower() if value.strip() else ""
    return word or None


def make_recipient(
    recipient: str,
    *,
    action: str | None,
    status: str | None,
    diagnostic: str,
    standard: bool,
    source: str,
    remote_mta: str | None = None,
    original_recipient: str | None = None,
    last_attempt: str | None = None,
    reporting_mta: str | None = None,
) -> DSNRecipient:
    """Build a record; codes missing from the fields are read from the diagnostic (see the module notes)."""
    action = normalize_action(action)
    success = action in SUCCESS_ACTIONS
    classes = "2" if success else "45"
    code, enh = codes_in(diagnostic, classes)
    status = status_field(status)
    if status is not None and (status[0] == "2") != success:
        status = None  # a failure's 2.x.x (or a success's 5.x.x) is not believable
    if not success and _SUCCESS_REPLY.match(diagnostic):
        # Sendmail writes the last reply of the session (its QUIT's "221 2.0.0 Bye" after a 421 greeting):
        # not the reason; the report's prose (its transcript) gives it, or nothing does.
        diagnostic, code, enh = "", None, None
    status = refined_status(status, enh)
    if action == "failed" and code is not None and code // 100 == 4 and (status is None or status.endswith(".0.0")):
        # Given up after a temporary refusal (Courier, Sendmail: "Status: 5.0.0" and the receiver's last
        # 452): the queue's lifetime ended, not a permanent verdict on the address (RFC 3463 4.4.7).
        status = "4.4.7"
    return DSNRecipient(
        recipient=recipient.strip().lower(),
        action=action,
        status=status,
        diagnostic=" ".join(diagnostic.split()),
        remote_mta=remote_mta,
        reply_code=code,
        standard=standard,
        original_recipient=original_recipient.strip().lower() if original_recipient else None,
        last_attempt=last_attempt,
        reporting_mta=reporting_mta,
        source=source,
    )
