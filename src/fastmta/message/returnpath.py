"""Signed return paths (VERP) and the trace header: what comes back can be mapped, and not forged.

A bounce comes back to the envelope sender; a complaint (ARF) carries the
message's headers, not its envelope. So each campaign message gets

* an envelope sender ``b-<ref>-<mac>@<bounce domain>``, and
* a header ``X-Fastmta-Ref: <ref>-<mac>`` (DKIM-signed by default),

where *ref* is the campaign id (or the message id outside a campaign) and
*mac* an HMAC-SHA256 over *ref* and the recipient, keyed with the operator's
secret, truncated to 80 bits and written in base32. Properties:

* **stable per recipient**: the same campaign and recipient give the same
  return path on every retry (greylisting keys on the sender: a new one per
  attempt would start it over);
* **not forgeable, not enumerable**: without the secret nobody can make a
  valid return path for an address, nor learn the recipient from one; the
  recipient comes from the bounce itself (its Final-Recipient) and is
  checked against the mac;
* **short**: the local part stays under RFC 5321's 64 octets (the ref is cut
  to 32 characters and reduced to ``[a-z0-9.]``).

Complaint loops that redact the recipient (Yahoo's, AOL's: ``To: [redacted]``)
leave only the headers to go by, and the mac can check a recipient but not
name one. So the trace also carries ``X-Fastmta-Rcpt``: the recipient sealed
with AES-SIV under a key derived from the same secret (deterministic, so the
same on every retry; authenticated, so nobody can make one that opens to an
address of their choosing; and opaque, so it reveals the address to nobody
else, which is also why a redactor leaves it alone).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

__all__ = ["RCPT_HEADER", "TRACE_HEADER", "ReturnPath"]

TRACE_HEADER = "X-Fastmta-Ref"
RCPT_HEADER = "X-Fastmta-Rcpt"
_REF_CHARS = re.compile(r"[^a-z0-9.]+")
_MAC_BYTES = 10  # 80 bits: forging one return path takes ~2^80 tries
_ADDRESS = re.compile(r"^(?P<prefix>[a-z0-9]+)-(?P<ref>[a-z0-9.]{1,32})-(?P<mac>[a-z2-7]{16})$")


def _clean_ref(ref: str) -> str:
    cleaned = _REF_CHARS.sub(".", ref.lower()).strip(".")[:32].strip(".")
    return cleaned or "x"


class ReturnPath:
    """Makes and checks return paths on *domain* with *secret* (keep it out of the repository)."""

    def __init__(self, secret: bytes, domain: str, prefix: str = "b") -> None:
        if len(secret) < 16:
            raise ValueError("the return path secret must be at least 16 bytes")
        if not re.fullmatch(r"[a-z0-9]+", prefix):
            raise ValueError("the return path prefix must be letters and digits")
        self._secret = secret
        self.domain = domain.lower().rstrip(".")
        self.prefix = prefix
        # A key of its own for the seal (AES-256-SIV takes 64 bytes), derived from the secret.
        self._siv = AESSIV(hmac.new(secret, b"fastmta recipient seal", hashlib.sha512).digest())

    def _mac(self, ref: str, recipient: str) -> str:
        digest = hmac.new(self._secret, f"{ref}\x00{recipient.strip().lower()}".encode(), hashlib.sha256).digest()
        return base64.b32encode(digest[:_MAC_BYTES]).decode("ascii").lower()

    def token(self, ref: str, recipient: str) -> str:
        """``<ref>-<mac>``: the trace header's value, and the return path's local part after the prefix."""
        ref = _clean_ref(ref)
        return f"{ref}-{self._mac(ref, recipient)}"

    def address(self, ref: str, recipient: str) -> str:
        """The envelope sender for *recipient* of campaign (or message) *ref*."""
        return f"{self.prefix}-{self.token(ref, recipient)}@{self.domain}"

    def seal(self, recipient: str) -> str:
        """*recipient*, sealed (see the module's doc): base64url, no padding."""
        sealed = self._siv.encrypt(recipient.strip().lower().encode("utf-8"), None)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def unseal(self, text: str) -> str | None:
        """The recipient a :meth:`seal` holds; None for anything this secret did not seal."""
        text = text.strip()
        try:
            return self._siv.decrypt(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), None).decode("utf-8")
        except (InvalidTag, ValueError, binascii.Error, UnicodeDecodeError):
            return None

    def trace_header(self, ref: str, recipient: str) -> bytes:
        """The trace headers of a message to *recipient*: the ref and its mac, and the sealed recipient."""
        return f"{TRACE_HEADER}: {self.token(ref, recipient)}\r\n{RCPT_HEADER}: {self.seal(recipient)}\r\n".encode(
            "ascii")

    def parse(self, address_or_token: str) -> tuple[str, str] | None:
        """(ref, mac) of one of our return paths or trace values, or None; not yet verified."""
        text = address_or_token.strip().strip("<>").lower()
        local, at, domain = text.rpartition("@")
        if at:
            if domain.rstrip(".") != self.domain:
                return None
            text = local
        else:
            text = f"{self.prefix}-{text}"
        m = _ADDRESS.match(text)
        if m is None or m.group("prefix") != self.prefix:
            return None
        return m.group("ref"), m.group("mac")

    def verify(self, address_or_token: str, recipient: str) -> str | None:
        """The ref, if *address_or_token* is a genuine return path (or trace) for *recipient*; else None."""
        parsed = self.parse(address_or_token)
        if parsed is None:
            return None
        ref, mac = parsed
        return ref if hmac.compare_digest(mac, self._mac(ref, recipient)) else None
