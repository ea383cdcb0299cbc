"""Selects the compiled ``_core`` or its pure-Python reference ``_core_ref``.

Set ``FASTMTA_NO_EXTENSIONS=1`` to force the reference (the same switch
aiohttp and others use). If the extension is missing without that switch we
still run, but warn: a silently slow install is worse than a noisy one.
"""

from __future__ import annotations

import os
import warnings

from fastmta import _core_ref

COMPILED: bool
if os.environ.get("FASTMTA_NO_EXTENSIONS"):
    _impl = _core_ref
    COMPILED = False
else:
    try:
        from fastmta import _core as _impl  # type: ignore[no-redef]

        COMPILED = True
    except ImportError:  # pragma: no cover - depends on the build
        warnings.warn(
            "fastmta._core is not built; using the slow pure-Python reference "
            "(run `pip install -e .` to compile it)",
            RuntimeWarning,
            stacklevel=2,
        )
        _impl = _core_ref
        COMPILED = False

to_wire = _impl.to_wire
normalize_crlf = _impl.normalize_crlf
canonicalize_body = _impl.canonicalize_body
BodyCanonicalizer = _impl.BodyCanonicalizer
canonicalize_header = _impl.canonicalize_header
split_header_fields = _impl.split_header_fields
index_header_fields = _impl.index_header_fields
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
    "index_header_fields",
    "is_7bit_safe",
    "normalize_crlf",
    "quoted_printable",
    "render",
    "select_headers",
    "split_header_fields",
    "to_wire",
]
