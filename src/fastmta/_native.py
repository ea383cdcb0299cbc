"""Chooses between a compiled module and its pure-Python twin.

Set ``FASTMTA_NO_EXTENSIONS=1`` to force the pure-Python twins (the same switch
aiohttp and others use). If an extension is missing without that switch we
still run, but warn: a silently slow install is worse than a noisy one.

It lives at the top of the package, beside ``errors``, because both compiled
modules use it (``fastmta.message._core`` and ``fastmta.smtp._client``) and
neither subpackage may import the other.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType


def select_implementation(compiled: str, reference: ModuleType) -> tuple[ModuleType, bool]:
    """The compiled module *compiled* (a dotted name), or *reference*; and whether it is the compiled one."""
    if os.environ.get("FASTMTA_NO_EXTENSIONS"):
        return reference, False
    try:
        return importlib.import_module(compiled), True
    except ImportError:  # pragma: no cover - depends on the build
        warnings.warn(
            f"{compiled} is not built; using the slow pure-Python reference "
            "(run `pip install -e .` to compile it)",
            RuntimeWarning,
            stacklevel=3,
        )
        return reference, False
