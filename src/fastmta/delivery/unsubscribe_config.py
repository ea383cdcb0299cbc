"""``[unsubscribe]``: RFC 8058 one-click unsubscribe headers on campaign mail (``fastmta.message.unsubscribe``).

Example::

    [unsubscribe]
    base_url = "https://u.example.com"     # fastmta serve answers POST/GET /u/TOKEN there (https only)
    mailto_domain = "u.example.com"        # optional: also <mailto:u@u.example.com?subject=TOKEN>
    secret_file = ""                       # default: [return_path] secret_file (a distinct key is derived)
    # max_age_days = 0                     # 0: tokens never expire
    # enabled = true                       # on when base_url is set
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from fastmta.message.unsubscribe import Unsubscribe

__all__ = ["UnsubscribeConfig"]


class UnsubscribeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One-click unsubscribe for campaigns; off while *base_url* is empty."""

    base_url: str = ""
    mailto_domain: str = ""
    secret_file: str = ""  # 16+ bytes; empty: the return path's secret_file
    max_age_days: Annotated[int, msgspec.Meta(ge=0)] = 0
    enabled: bool = True

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.base_url)

    def __post_init__(self) -> None:
        if self.base_url:
            # The URL and domain are checked now (the secret when it is read):
            # Unsubscribe raises ValueError, which msgspec reports with the key.
            Unsubscribe(b"\x00" * 16, self.base_url, self.mailto_domain or None)

    def build(self, return_path_secret_file: str = "") -> Unsubscribe | None:
        """The :class:`Unsubscribe` this section configures (None: off).

        Reads the secret file; OSError if it cannot, ValueError if there is
        none to read or it is shorter than 16 bytes.
        """
        if not self.active:
            return None
        secret_file = self.secret_file or return_path_secret_file
        if not secret_file:
            raise ValueError("unsubscribe.base_url needs unsubscribe.secret_file or return_path.secret_file")
        secret = Path(secret_file).read_bytes().strip()
        return Unsubscribe(secret, self.base_url, self.mailto_domain or None, max_age_days=self.max_age_days or None)
