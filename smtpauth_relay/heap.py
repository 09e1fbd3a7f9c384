"""
The startup heap, moved out of the garbage collector's way.

What the relay builds before it serves (modules, the configuration, TLS
contexts, the portal and its checkers, the listeners) lives as long as the
process: some 70,000 objects in the benchmark.  Every full (generation 2)
collection walks them all: up to 49 ms in the benchmark's C{s64} run, and
every session of the process waits for it.  C{gc.freeze()} moves them into
a permanent generation that no collection walks.

After a configuration reload the objects it replaced are still frozen:
those in reference cycles are not freed (reference counting frees the
rest).  Reloads are rare and small; that is the price of the freeze.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()


class StartupHeapFreezer(Service):
    """
    Once the reactor runs (every service started), collects the garbage of
    the startup and freezes the rest.

    @param collector: the C{gc} module (a fake in tests).
    """

    def __init__(self, reactor: Any, collector: Any = gc) -> None:
        self.reactor = reactor
        self.collector = collector

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self.freeze)

    def freeze(self) -> None:
        """
        Collect, then freeze what is left.
        """
        self.collector.collect()
        self.collector.freeze()
        log.debug(
            "froze {count} startup objects out of the garbage collector's way",
            count=self.collector.get_freeze_count(),
        )
