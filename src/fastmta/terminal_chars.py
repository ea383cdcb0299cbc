"""The characters a terminal acts on, beyond the C0 controls: one definition for every place that shows or
writes text others wrote (the screen, the accounting logs).

DEL, the C1 controls (U+009B is a CSI: an escape sequence in one character), and the characters that
reorder or break the line shown (bidi marks, embeddings, overrides and isolates; line and paragraph
separators). A regular-expression character class, without its brackets, to combine with what each
place also refuses (C0, with or without the newline).
"""

from __future__ import annotations

__all__ = ["BEYOND_C0"]

BEYOND_C0 = "\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
