"""Amazon SES notifications (the JSON that SES publishes through SNS to e-mail).

SES reports bounces, deliveries and complaints as a JSON document in the body
of an "AWS Notification Message", either bare or wrapped in an SNS envelope
(``{"Type": "Notification", "Message": "<json>"}``); mail transports may wrap
its long line. :func:`ses_notification` finds and decodes it; the bounce
reader (:mod:`fastmta.feedback.dsn`) and the complaint reader
(:mod:`fastmta.feedback.arf`) take what they need from it.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["ses_notification"]

_KINDS = ("Bounce", "Complaint", "Delivery")


def _decode(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    while start != -1:
        chunk = text[start:]
        for candidate in (chunk, chunk.replace("\r", "").replace("\n ", "").replace("\n", ""), chunk.replace("\r", "").replace("\n", "")):
            try:
                value, _ = json.JSONDecoder().raw_decode(candidate)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
        start = text.find("{", start + 1)
        if start > 4096:
            break
    return None


def ses_notification(text: str) -> dict[str, Any] | None:
    """The SES notification in *text* (SNS envelope removed); None when there is none."""
    if "notificationType" not in text and "eventType" not in text:
        return None
    doc = _decode(text)
    if doc is None:
        return None
    if doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str):
        inner = _decode(doc["Message"])
        if inner is None:
            return None
        doc = inner
    kind = doc.get("notificationType") or doc.get("eventType")
    return doc if kind in _KINDS else None
