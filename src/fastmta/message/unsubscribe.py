"""RFC 8058 one-click unsubscribe: signed per-recipient tokens and the two header fields.

Each campaign message gets (RFC 2369, RFC 8058 3.1)::

    List-Unsubscribe: <https://u.example.com/u/TOKEN>,
     <mailto:u@u.example.com?subject=TOKEN>
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

where TOKEN is URL-safe base64 (no padding) of::

    version (1 byte) | issue day (3 bytes, days since 1970) | len(list tag) (1 byte)
    | list tag (UTF-8) | recipient (UTF-8) | HMAC-SHA256(key, everything before)[:16]

So the server that receives the POST needs no database lookup: the token
says which address leaves which list, and the 128-bit MAC says that we
issued it. Properties:

* **not forgeable**: without the secret nobody can make a token for another
  address or list; any changed byte fails the constant-time MAC check;
* **domain-separated**: the MAC key is derived from the secret
  (``HMAC(secret, "fastmta/unsubscribe/v1")``), so the same secret may serve
  the signed return paths (``fastmta.message.returnpath``, which MACs with
  the secret itself) without a value of one ever being valid for the other;
* **bounded**: list tags up to 128 bytes, recipients up to 254 (RFC 5321's
  path limit); :meth:`Unsubscribe.verify` refuses anything longer than the
  longest token it could have made before decoding it;
* **header-safe**: the header carries only the configured URL (checked when
  :class:`Unsubscribe` is made: https, no spaces, brackets or commas) and the
  token's ``[A-Za-z0-9_-]``; whatever a recipient address holds, it cannot
  reach the header as text (and CR, LF, NUL or other controls in it are
  refused outright).

The mailto: URI carries the token in its subject, not in the local part: a
token is longer than the 64 octets RFC 5321 allows a local part.
:meth:`Unsubscribe.from_mail` finds it in either place.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Callable

__all__ = ["LIST_UNSUBSCRIBE_POST", "MAX_TOKEN_CHARS", "Unsubscribe"]

#: The one value RFC 8058 3.1 allows: the POST body a mail client sends.
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe=One-Click"
_VERSION = 1
_MAC_BYTES = 16
_MAX_TAG = 128
_MAX_RECIPIENT = 254
_FIXED = 1 + 3 + 1
#: The longest token :meth:`Unsubscribe.token` can make (base64 of the longest payload and the MAC).
MAX_TOKEN_CHARS = -(-(_FIXED + _MAX_TAG + _MAX_RECIPIENT + _MAC_BYTES) * 4 // 3)
_MIN_TOKEN_BYTES = _FIXED + 1 + _MAC_BYTES  # a tag of one byte at least; the recipient may not be empty either
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
# https, a host (name, IPv4 or [IPv6]), an optional port and path: no space,
# no '<', '>', ',' or quote that would end or split the header's URI list.
_BASE_URL = re.compile(r"https://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~%!$&'()*+;=:@/-]*)?")
_DOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
_DAY = 86400


class Unsubscribe:
    """Makes and checks one-click unsubscribe tokens and headers.

    *secret*: 16+ bytes (by default the return path's ``secret_file``);
    *base_url*: where ``POST /u/TOKEN`` is served (``https://u.example.com``);
    *mailto_domain*: where unsubscribe mail goes (None: no mailto: URI);
    *max_age_days*: tokens older than this are refused (None: never expire:
    an unsubscribe link must keep working as long as the mail is read).
    """

    def __init__(
        self, secret: bytes, base_url: str, mailto_domain: str | None = None, *,
        max_age_days: int | None = None, clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the unsubscribe secret must be at least 16 bytes")
        base_url = base_url.rstrip("/")
        if not _BASE_URL.fullmatch(base_url) or len(base_url) > 200:
            raise ValueError(f"unsubscribe base_url must be an https:// URL without spaces or <>,\" (got {base_url!r})")
        if mailto_domain is not None:
            mailto_domain = mailto_domain.strip().lower().rstrip(".")
            if not _DOMAIN.fullmatch(mailto_domain):
                raise ValueError(f"unsubscribe mailto_domain is not a domain name: {mailto_domain!r}")
        if max_age_days is not None and max_age_days < 1:
            raise ValueError("unsubscribe max_age_days must be at least 1")
        # Domain separation: the return paths MAC with the secret itself.
        self._key = hmac.new(secret, b"fastmta/unsubscribe/v1", hashlib.sha256).digest()
        self.base_url = base_url
        self.mailto_domain = mailto_domain or None
        self.max_age_days = max_age_days
        self._clock = clock

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def token(self, list_tag: str, recipient: str) -> str:
        """The signed token for *recipient* on *list_tag*; ValueError if either cannot be carried."""
        recipient = recipient.strip()
        tag = list_tag.encode("utf-8")
        rcpt = recipient.encode("utf-8")
        if not tag or len(tag) > _MAX_TAG or _CONTROL.search(list_tag):
            raise ValueError(f"unsubscribe list tag must be 1 to {_MAX_TAG} bytes without control characters")
        if not rcpt or len(rcpt) > _MAX_RECIPIENT or _CONTROL.search(recipient):
            raise ValueError(f"unsubscribe recipient must be 1 to {_MAX_RECIPIENT} bytes without control characters")
        day = int(self._clock() // _DAY)
        payload = bytes([_VERSION]) + day.to_bytes(3, "big") + bytes([len(tag)]) + tag + rcpt
        return base64.urlsafe_b64encode(payload + self._mac(payload)).rstrip(b"=").decode("ascii")

    def url(self, list_tag: str, recipient: str) -> str:
        return f"{self.base_url}/u/{self.token(list_tag, recipient)}"

    def headers(self, list_tag: str, recipient: str) -> bytes:
        """``List-Unsubscribe`` and ``List-Unsubscribe-Post``, folded, CRLF-ended, ready to put on a message."""
        token = self.token(list_tag, recipient)
        uris = [f"<{self.base_url}/u/{token}>"]
        if self.mailto_domain is not None:
            uris.append(f"<mailto:u@{self.mailto_domain}?subject={token}>")
        # Folded between the URIs only (never inside one: not every reader
        # ignores whitespace within the brackets); every line stays < 998 octets.
        line = "List-Unsubscribe: " + ", ".join(uris)
        if len(line) > 78:
            line = "List-Unsubscribe: " + ",\r\n ".join(uris)
        return f"{line}\r\nList-Unsubscribe-Post: {LIST_UNSUBSCRIBE_POST}\r\n".encode("ascii")

    def verify(self, token: str) -> tuple[str, str] | None:
        """(list tag, recipient) of a genuine, unexpired token; None for anything else."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not _TOKEN.fullmatch(token):
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < _MIN_TOKEN_BYTES:
            return None
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        # From here on the bytes are ours: only the version and age can still refuse them.
        if payload[0] != _VERSION:
            return None
        day = int.from_bytes(payload[1:4], "big")
        today = int(self._clock() // _DAY)
        if day > today + 1 or (self.max_age_days is not None and today - day > self.max_age_days):
            return None
        n = payload[4]
        tag, rcpt = payload[_FIXED : _FIXED + n], payload[_FIXED + n :]
        if not tag or not rcpt:
            return None
        try:
            return tag.decode("utf-8"), rcpt.decode("utf-8")
        except UnicodeDecodeError:  # pragma: no cover - we never sign such bytes
            return None

    def from_mail(self, rcpt_to: str, subject: str) -> tuple[str, str] | None:
        """(list tag, recipient) of an unsubscribe mail: its token in the subject, or a ``u-TOKEN@`` recipient."""
        local, _, _ = rcpt_to.strip().strip("<>").rpartition("@")
        candidates = [w for w in re.split(r"[\s:]+", subject) if w]
        if local.lower().startswith("u-"):
            candidates.insert(0, local[2:])
        for candidate in candidates:
            found = self.verify(candidate)
            if found is not None:
                return found
        return None
