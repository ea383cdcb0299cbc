"""Process-wide settings for the commands that deliver mail for a long time (``send``, ``serve``).

Only the commands set them: a program that embeds the engine keeps its own.

The cyclic garbage collector. CPython runs a young-generation collection
every 700 net allocations of container objects, and a delivery allocates a
few hundred per message (its records, batch, transaction, outcome, the
journal's and the accounting log's encodings): a collection every few
messages, each walking every young object, and a full one now and then over
the whole heap (the read-ahead, the queue's key sets). Nearly all of it is
freed by reference counting the moment it is done with; the collector only
finds cycles, and there are few. Measured on ``fastmta send`` of 20,000
pickup files (``gc.callbacks`` timing every collection): 0.25 s in 482
collections with the defaults, 0.03 s in 2 with the settings below, about
11 µs a message, 4% of the process's CPU. What start-up built (modules,
configuration, compiled templates) is frozen out of the collector's view
first: it lives as long as the process.

Cyclic garbage still goes: a young collection every 50,000 net allocations
(a few MB at most waiting), an older one every 20 of those; and the full
collection keeps CPython's own brake (it runs only when the long-lived
objects have grown by a quarter since the last one).
"""

from __future__ import annotations

import gc

__all__ = ["GC_THRESHOLDS", "tune_gc"]

#: (young, middle, old) collection thresholds for a delivery process.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Freeze what start-up allocated and space the collector's runs out (see the module's docstring)."""
    gc.collect()  # start-up's own cycles, once, rather than frozen for ever
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
