"""The long-lived heap kept out of the garbage collector's walks.

A relay process makes most of its objects at start (modules, the config, the web app,
pools) and keeps them until it exits. Frozen (`gc.freeze`), they are no longer walked by
every full collection, which on a loaded event loop took 50-120 ms each (the slowest
replies of a latency run). A reload replaces some of them: frozen objects are never
collected, so whatever the reload dropped that sits in a reference cycle (an upstream's
client, a destination, the old config) would stay for the life of the process unless the
heap is thawed, collected and frozen again.
"""

from __future__ import annotations

import gc


def freeze() -> int:
    """Collect, then freeze what is left; the number of objects now frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def refreeze() -> int:
    """After a reload: thaw, collect what the reload let go, freeze again. One full
    collection of the whole heap, once per reload."""
    gc.unfreeze()
    return freeze()
