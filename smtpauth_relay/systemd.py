"""
The systemd notification protocol (C{sd_notify}): C{Type=notify} units learn
from us when the relay is ready, reloading or stopping, and get watchdog
pings when C{WatchdogSec=} is set.

The protocol is one datagram per state change, C{KEY=VALUE} lines, sent to
the UNIX socket named by C{NOTIFY_SOCKET} (a leading C{@} means the abstract
namespace).  Outside systemd (no C{NOTIFY_SOCKET}) everything here does
nothing.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


class Notifier:
    """
    Sends state changes to systemd.

    @ivar address: the socket address, or C{None} when not under systemd.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        path = environ.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        self.watchdogInterval: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdogInterval = int(usec) / 1_000_000

    def notify(self, *states: str) -> bool:
        """
        Send C{states} (such as C{"READY=1"}); return whether it was sent.
        """
        if self.address is None:
            return False
        message = "\n".join(states).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(message, self.address)
        except OSError as e:
            log.warn("cannot notify systemd: {error}", error=e)
            return False
        return True


class NotifyService(Service):
    """
    Tells systemd the relay is ready once every other service has started
    (add it to the top service last), that it is stopping as soon as the
    stop begins (it is stopped first), and pings the watchdog.
    """

    def __init__(self, notifier: Notifier, clock: Any) -> None:
        self.notifier = notifier
        self.clock = clock
        self._watchdog: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self.notifier.notify("READY=1", "STATUS=accepting mail"):
            log.info("told systemd we are ready")
        if self.notifier.watchdogInterval:
            self._watchdog = LoopingCall(self.notifier.notify, "WATCHDOG=1")
            self._watchdog.clock = self.clock
            self._watchdog.start(self.notifier.watchdogInterval / 2, now=True)

    def stopService(self) -> None:
        super().stopService()
        self.notifier.notify("STOPPING=1", "STATUS=stopping")
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None

    def reloading(self) -> None:
        """
        A reload begins (C{RELOADING=1}); call L{reloaded} when it is over.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def reloaded(self, status: str) -> None:
        """
        The reload is over, whatever its outcome (C{READY=1} again).
        """
        self.notifier.notify("READY=1", f"STATUS={status}")
