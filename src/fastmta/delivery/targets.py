"""What an operator's queue target names: ``site:NAME``, ``domain:NAME``, ``campaign:ID``, ``message:ID``,
or a bare word (a message id, a site or a domain name); read the same by every queue command."""

from __future__ import annotations

__all__ = ["KINDS", "parse_target"]

KINDS = ("site", "domain", "campaign", "message")


def parse_target(target: str) -> tuple[str, str]:
    """(kind, value) of a target; kind "any" for a bare word. ValueError when empty, or with control
    characters or spaces (a campaign id may have spaces)."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError("empty target (expected site:NAME, domain:NAME, campaign:ID or a message id)")
    text = target.strip()
    kind, sep, value = text.partition(":")
    if sep and kind.lower() in KINDS:
        kind = kind.lower()
        if not value:
            raise ValueError(f"target {target!r} names no {kind}")
    elif sep and kind.isalpha() and not value.isdigit():
        # "source:ip1": a kind this queue does not know. As a bare word it was a rule holding nothing,
        # answered "suspended". (A bare word with a colon is a host:port site, "localhost:2525".)
        raise ValueError(f"target {target!r}: unknown kind {kind!r} (site:NAME, domain:NAME, campaign:ID, "
                         "message:ID, or a bare site or domain name)")
    else:
        kind, value = "any", text  # e.g. a static route's site "127.0.0.1:2525"
    if any(ord(c) < 32 or c == "\x7f" or (c.isspace() and kind != "campaign") for c in value):
        raise ValueError(f"target {target!r} has spaces or control characters")
    if kind in ("site", "domain", "any"):
        value = value.lower().rstrip(".") or value
    return kind, value
