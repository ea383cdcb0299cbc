"""Fitting an internationalised envelope to a server that does not offer SMTPUTF8.

RFC 6531 lets a UTF-8 address through only on a session where the server
offers SMTPUTF8. Without it, one ``renée@`` among a message's recipients
must not sink the others (before: the whole transaction failed 553 5.6.7):

* an address whose local part is ASCII and only its domain is not
  (``kunde@bücher.test``) goes out with the domain as IDNA A-labels
  (``kunde@xn--bcher-kva.test``): the same mailbox, no SMTPUTF8 needed;
* an address with a UTF-8 local part cannot be written in ASCII: that
  recipient alone fails, 553 5.6.7 (permanent: this server cannot take it);
* a sender with a UTF-8 local part, or raw UTF-8 in the headers (RFC 6532),
  fails the whole message with 553 5.6.7, as Postfix does (no downgrade).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import idna

from fastmta.smtp.model import Body
from fastmta.smtp.reply import Reply

__all__ = ["EnvelopePlan", "ascii_address", "plan_without_smtputf8"]

_NEEDS_UTF8 = "5.6.7"


def ascii_address(address: str) -> str | None:
    """*address* in ASCII (domain as A-labels), or None when its local part is not ASCII."""
    if address.isascii():
        return address
    local, _, domain = address.rpartition("@")
    if not local.isascii():
        return None
    try:
        return f"{local}@{idna.encode(domain, uts46=True).decode('ascii')}"
    except idna.IDNAError:
        return None


@dataclass(slots=True)
class EnvelopePlan:
    """What to send on a session without SMTPUTF8."""

    sender: str = ""
    #: (index in the batch, address to write) for every recipient that can go.
    recipients: list[tuple[int, str]] = field(default_factory=list)
    #: index -> the local failure of a recipient that cannot go.
    refused: dict[int, Reply] = field(default_factory=dict)


def plan_without_smtputf8(sender: str, recipients: Sequence[str], body: Body) -> EnvelopePlan:
    """Split a transaction for a server without SMTPUTF8 (see the module docs)."""
    plan = EnvelopePlan()
    whole: Reply | None = None
    if body.utf8_headers:
        whole = Reply.local(553, _NEEDS_UTF8, "message has UTF-8 headers and the server does not offer SMTPUTF8")
    else:
        ascii_sender = ascii_address(sender) if sender else ""
        if ascii_sender is None:
            whole = Reply.local(553, _NEEDS_UTF8, "non-ASCII sender and the server does not offer SMTPUTF8")
        else:
            plan.sender = ascii_sender
    for index, rcpt in enumerate(recipients):
        written = None if whole is not None else ascii_address(rcpt)
        if written is None:
            plan.refused[index] = whole or Reply.local(
                553, _NEEDS_UTF8, "non-ASCII mailbox name and the server does not offer SMTPUTF8"
            )
        else:
            plan.recipients.append((index, written))
    return plan


def envelope_for(
    sender: str, recipients: list[str], body: Body, smtputf8: bool,
) -> tuple[EnvelopePlan | None, str, list[str], list[str]]:
    """One transaction's envelope for a server that does (*smtputf8*) or does not offer SMTPUTF8:
    (the plan, if one was needed; the sender and recipients to send; those recipients as the
    message names them, for what is kept by address, such as their DSN parameters)."""
    if smtputf8 or (sender.isascii() and all(a.isascii() for a in recipients) and not body.utf8_headers):
        return None, sender, recipients, recipients
    plan = plan_without_smtputf8(sender, recipients, body)
    return plan, plan.sender, [a for _, a in plan.recipients], [recipients[i] for i, _ in plan.recipients]
