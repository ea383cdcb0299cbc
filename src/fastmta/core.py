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

__all__ = ["COMPILED", "normalize_crlf", "to_wire"]
