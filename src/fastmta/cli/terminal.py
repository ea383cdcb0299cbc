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
import traceback
from typing import Any

from rich.text import Text

from fastmta.terminal_chars import BEYOND_C0

# C0 controls, and what else a terminal acts on (fastmta.terminal_chars).
_UNSAFE = re.compile(f"[\x00-\x1f{BEYOND_C0}]")


#: How a traceback's own chunks start (frames, chaining): everything else is an exception's message.
_TRACEBACK_FRAMING = ("Traceback ", "  File ", "  [Previous line", "\nThe above exception", "\nDuring handling")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: object) -> str:
    """*text* with every control or display-changing character made a visible escape."""
    return _UNSAFE.sub(_visible, str(text))


def plain(text: object, style: str = "") -> Text:
    """*text* as a rich ``Text``: shown literally (no markup), escapes made visible."""
    return Text(safe_text(text), style=style)


class SafeFormatter(logging.Formatter):
    """Log lines carry reply texts and names from outside: escape them (tracebacks keep their lines).

    The message is escaped whole: a newline in it is never a line of its own, or a client's AUTH
    name, a reply's text, could forge whole log lines. A traceback keeps its lines, each escaped.
    """

    def format(self, record: logging.LogRecord) -> str:
        # Formatter.format reuses record.exc_text, which a handler before this one may have made from the
        # traceback unescaped: made again here, never taken from the record.
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text

    def formatMessage(self, record: logging.LogRecord) -> str:
        return safe_text(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        out = []
        for chunk in traceback.TracebackException(*ei[:3]).format():
            body, end = (chunk[:-1], "\n") if chunk.endswith("\n") else (chunk, "")
            if chunk.startswith(_TRACEBACK_FRAMING):  # ours: its lines stay lines
                out.append("\n".join(safe_text(line) for line in body.split("\n")) + end)
            else:  # "ValueError: <a message that may quote a client>": one line, always
                out.append(safe_text(body) + end)
        return "".join(out).rstrip("\n")

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(safe_text(line) for line in super().formatStack(stack_info).split("\n"))


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
