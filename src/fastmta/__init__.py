"""fastmta: a high-throughput email delivery engine.

The public API is importable from here; names are loaded on first use so
that ``fastmta sink`` or ``fastmta load`` do not pay for the engine's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "fastmta.engine",
    "EngineClosed": "fastmta.engine",
    "Outcome": "fastmta.message",
    "Status": "fastmta.message",
    "Config": "fastmta.config",
    "load_config": "fastmta.config",
    "parse_config": "fastmta.config",
    "config_from_dict": "fastmta.config",
    "Body": "fastmta.protocol",
    "Reply": "fastmta.reply",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from fastmta.config import Config, config_from_dict, load_config, parse_config
    from fastmta.engine import Engine, EngineClosed
    from fastmta.message import Outcome, Status
    from fastmta.protocol import Body
    from fastmta.reply import Reply


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastmta' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
