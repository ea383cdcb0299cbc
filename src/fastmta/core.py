"""Selects the compiled ``_core`` or its pure-Python reference ``_core_ref``.

Set ``FASTMTA_NO_EXTENSIONS=1`` to force the reference (the same switch
aiohttp and others use). If the extension is missing without that switch we
still run, but warn: a silently slow install is worse than a noisy one.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import TYPE_CHECKING

from fastmta import _core_ref

def select_implementation(compiled: str, reference: ModuleType) -> tuple[ModuleType, bool]:
    """The compiled module ``fastmta.<compiled>``, or *reference*; and whether it is the compiled one.

    Shared by every module with a compiled twin (this one and ``protocol``).
    """
    if os.environ.get("FASTMTA_NO_EXTENSIONS"):
        return reference, False
    try:
        return importlib.import_module(f"fastmta.{compiled}"), True
    except ImportError:  # pragma: no cover - depends on the build
        warnings.warn(
            f"fastmta.{compiled} is not built; using the slow pure-Python reference "
            "(run `pip install -e .` to compile it)",
            RuntimeWarning,
            stacklevel=3,
        )
        return reference, False


COMPILED: bool
if TYPE_CHECKING:
    _impl = _core_ref  # both have the same names and signatures; check against the reference
else:
    _impl, COMPILED = select_implementation("_core", _core_ref)

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
