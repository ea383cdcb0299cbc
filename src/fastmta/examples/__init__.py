"""The bundled example: a spool directory that ``fastmta demo`` delivers to the built-in sink.

``spool/`` holds a campaign job (``welcome.toml``: HTML and text templates,
10,000 recipients on reserved ``.example``/``.test`` domains, DKIM-signed with a
public *test* key) and three pickup files. It ships inside the package so an
installed fastmta can run its main job with nothing else on disk;
``scripts/make_example.py`` regenerates it.
"""

from __future__ import annotations

from pathlib import Path

#: The example spool directory (read-only in an installed package: copy it before sending).
SPOOL = Path(__file__).resolve().parent / "spool"

__all__ = ["SPOOL"]
