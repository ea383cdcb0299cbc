"""The compiled ``_core`` or its pure-Python reference ``_core_ref``, under one set of names.

``FASTMTA_NO_EXTENSIONS=1`` selects the reference (see :mod:`fastmta._native`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastmta._native import select_implementation
from fastmta.message import _core_ref

COMPILED: bool
if TYPE_CHECKING:
    _impl = _core_ref  # both have the same names and signatures; check against the reference
else:
    _impl, COMPILED = select_implementation("fastmta.message._core", _core_ref)

to_wire = _impl.to_wire
normalize_crlf = _impl.normalize_crlf
canonicalize_body = _impl.canonicalize_body
BodyCanonicalizer = _impl.BodyCanonicalizer
canonicalize_header = _impl.canonicalize_header
split_header_fields = _impl.split_header_fields
index_header_fields = _impl.index_header_fields
find_header_fields = _impl.find_header_fields
select_headers = _impl.select_headers
escape = _impl.escape
render = _impl.render
is_7bit_safe = _impl.is_7bit_safe
quoted_printable = _impl.quoted_printable

# Escaping modes of a template slot; identical in both implementations.
MODE_TEXT: int = _core_ref.MODE_TEXT
MODE_HTML: int = _core_ref.MODE_HTML
MODE_URL_COMPONENT: int = _core_ref.MODE_URL_COMPONENT
MODE_URL: int = _core_ref.MODE_URL
MODE_HEADER: int = _core_ref.MODE_HEADER

__all__ = [
    "COMPILED",
    "MODE_HEADER",
    "MODE_HTML",
    "MODE_TEXT",
    "MODE_URL",
    "MODE_URL_COMPONENT",
    "BodyCanonicalizer",
    "canonicalize_body",
    "canonicalize_header",
    "escape",
    "find_header_fields",
    "index_header_fields",
    "is_7bit_safe",
    "normalize_crlf",
    "quoted_printable",
    "render",
    "select_headers",
    "split_header_fields",
    "to_wire",
]
