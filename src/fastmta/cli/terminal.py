"""Making user-controlled text safe to show on a terminal.

File names, CSV column names, addresses, SMTP replies and DNS names reach the
screen; any of them can hold an escape sequence (``ESC]0;title BEL`` sets the
window title, ``ESC[2J`` clears the screen), a bidi override that reorders
what is shown, or - for rich - markup such as ``[link=...]``. Everything of
that kind is shown as a visible escape (``\\x1b``), and text goes to rich as
``Text`` (never parsed for markup).
"""

from __future__ import annotations

import logging
import re

from rich.text import Text

from fastmta.terminal_chars import BEYOND_C0

# C0 controls, and what else a terminal acts on (fastmta.terminal_chars).
_UNSAFE = re.compile(f"[\x00-\x1f{BEYOND_C0}]")
_UNSAFE_KEEP_NEWLINES = re.compile(f"[\x00-\x09\x0b-\x1f{BEYOND_C0}]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: object, *, keep_newlines: bool = False) -> str:
    """*text* with every control or display-changing character made a visible escape."""
    pattern = _UNSAFE_KEEP_NEWLINES if keep_newlines else _UNSAFE
    return pattern.sub(_visible, str(text))


def plain(text: object, style: str = "") -> Text:
    """*text* as a rich ``Text``: shown literally (no markup), escapes made visible."""
    return Text(safe_text(text), style=style)


class SafeFormatter(logging.Formatter):
    """Log lines carry reply texts and names from outside: escape them (tracebacks keep their lines)."""

    def format(self, record: logging.LogRecord) -> str:
        return safe_text(super().format(record), keep_newlines=True)


def install_safe_logging() -> None:
    """Route warnings and errors to stderr through :class:`SafeFormatter` (once per process)."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, SafeFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
