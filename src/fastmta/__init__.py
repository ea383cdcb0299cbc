"""fastmta: a high-throughput email delivery engine.

The public API is importable from here. Names are loaded on first use, so that
``fastmta sink`` or ``fastmta load`` do not pay for the engine's imports; the
``TYPE_CHECKING`` block re-exports the same names explicitly for type checkers
(``import X as X``), so ``mypy --strict`` accepts ``fastmta.Engine``.

The package is laid out by subsystem, in the direction data flows (imports only
go downwards; ``.importlinter`` in pyproject.toml enforces it)::

    cli                          the command line
    sink | load                  test servers and load generation (never the engine)
    delivery | intake            engine, routing, pools, throttle | spool, pickup, campaigns
    queue | feedback             durable journal and records | reply classification, DSNs
    smtp                         the wire: replies, sans-IO client protocol, connection
    message                      compiled core, templates, MIME, DKIM
    errors, _native              shared leaves
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "fastmta.delivery.engine",
    "EngineClosed": "fastmta.delivery.engine",
    "Outcome": "fastmta.queue.records",
    "Status": "fastmta.queue.records",
    "Config": "fastmta.delivery.config",
    "load_config": "fastmta.delivery.config",
    "parse_config": "fastmta.delivery.config",
    "config_from_dict": "fastmta.delivery.config",
    "Body": "fastmta.smtp.protocol",
    "Reply": "fastmta.smtp.reply",
    "FastMTAError": "fastmta.errors",
    "ConfigError": "fastmta.errors",
    "InputError": "fastmta.errors",
    "DeliveryError": "fastmta.errors",
}

__all__ = [
    "Body",
    "Config",
    "ConfigError",
    "DeliveryError",
    "Engine",
    "EngineClosed",
    "FastMTAError",
    "InputError",
    "Outcome",
    "Reply",
    "Status",
    "__version__",
    "config_from_dict",
    "load_config",
    "parse_config",
]

if TYPE_CHECKING:
    from fastmta.delivery.config import Config as Config
    from fastmta.delivery.config import config_from_dict as config_from_dict
    from fastmta.delivery.config import load_config as load_config
    from fastmta.delivery.config import parse_config as parse_config
    from fastmta.delivery.engine import Engine as Engine
    from fastmta.delivery.engine import EngineClosed as EngineClosed
    from fastmta.errors import ConfigError as ConfigError
    from fastmta.errors import DeliveryError as DeliveryError
    from fastmta.errors import FastMTAError as FastMTAError
    from fastmta.errors import InputError as InputError
    from fastmta.queue.records import Outcome as Outcome
    from fastmta.queue.records import Status as Status
    from fastmta.smtp.protocol import Body as Body
    from fastmta.smtp.reply import Reply as Reply


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastmta' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
