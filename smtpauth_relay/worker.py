"""
A worker process (C{[server] workers}, see L{smtpauth_relay.workers}): SMTP
sessions on listening sockets inherited from the main process, which it
reaches over the channel on descriptor 3 (L{smtpauth_relay.ipc}).

Started by the main process only, through L{smtpauth_relay.workerstart}::

    python -m smtpauth_relay.workerstart MAIN_PID --config PATH --index N \\
        --listener LISTENER:FD ... [--auth CHECKER ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
)

from smtpauth_relay.config import Config, loadConfig, parseConfig
from smtpauth_relay.errors import ConfigError
from smtpauth_relay.heap import StartupHeapFreezer
from smtpauth_relay.ipc import (
    MetricsForwarder,
    Ready,
    RemoteAdmission,
    RemoteFlow,
    RemoteLockout,
    RemoteRateLimits,
    WorkerChannel,
    tell,
)
from smtpauth_relay.logformat import JSONLinesObserver, textObserver, workerObserver
from smtpauth_relay.passwords import SALT_KEY_FILE, saltKey, useSaltKey
from smtpauth_relay.server import ConnectionLimiter
from smtpauth_relay.service import (
    Relay,
    Reloader,
    SessionDrain,
    makeListenerFactory,
    makeSessionParts,
)
from smtpauth_relay.spool import Spool
from smtpauth_relay.systemd import Notifier, NotifyService
from smtpauth_relay.threads import ownThreadRunner
from smtpauth_relay.workers import CHANNEL_FD, OneProtocolFactory

log = Logger(namespace="smtpauth_relay.worker")


class AdoptedListener(Service):
    """
    Accepts connections on an inherited listening socket.
    """

    def __init__(self, reactor: Any, fd: int, factory: Any) -> None:
        self.reactor = reactor
        self.fd = fd
        self.factory = factory
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        probe = socket.socket(fileno=self.fd)
        family = probe.family
        probe.detach()
        # adoptStreamPort takes a copy of the descriptor.
        self.port = self.reactor.adoptStreamPort(self.fd, family, self.factory)
        os.close(self.fd)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class WorkerService(MultiService):
    """
    A worker's services; once they have stopped (the sessions drained), the
    last session counts go to the main process.
    """

    def __init__(self, metrics: MetricsForwarder, channel: WorkerChannel) -> None:
        super().__init__()
        self.metrics = metrics
        self.channel = channel

    async def _stop(self) -> None:
        await super().stopService()
        await self.metrics.flush()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())


def makeWorkerService(
    config: Config,
    reactor: Any,
    channelFd: int,
    listeners: Sequence[tuple[int, int]],
    extraCheckers: Sequence[ICredentialsChecker] = (),
    index: int = 1,
    running: Config | None = None,
) -> WorkerService:
    """
    Build a worker: its sessions, on the listening sockets C{listeners}
    (C{(listener index, descriptor)}), its channel on C{channelFd}.
    Blocking (it reads the TLS files).

    @param running: what the main process runs now, if it has reloaded
        since it started with C{config}: switched to as a reload would.
    """

    def lost(reason: Any) -> None:
        if reactor.running:
            log.warn("the main process is gone; this worker stops")
            reactor.stop()

    channel = WorkerChannel(lost=lost)
    reactor.adoptStreamConnection(
        channelFd, socket.AF_UNIX, OneProtocolFactory(channel)
    )
    os.close(channelFd)

    # The main process's key: an unknown user's made-up SCRAM salt must not
    # depend on the process a client reaches.
    useSaltKey(
        saltKey(os.path.join(config.queue.directory, SALT_KEY_FILE), create=False)
    )
    runInThread = ownThreadRunner(reactor, "spool", 4)
    # The main process prepared (and locked) the spool; a worker only adds
    # messages to it.
    spool = Spool(config.queue.directory, runInThread, reactor, worker=index)
    spool.addListener(lambda queueId: channel.queued(queueId, spool.recent(queueId)))
    # Counting and refusing is the main process's (RemoteAdmission); this
    # limiter only knows this process's sessions, to close them at shutdown.
    limiter = ConnectionLimiter(sys.maxsize, sys.maxsize)
    lockout = RemoteLockout(channel, config.auth.lockout)
    limits = RemoteRateLimits(channel, config.limits)
    flow = RemoteFlow(channel, config.queue.flow_delay)
    metrics = MetricsForwarder(channel, reactor)
    top = WorkerService(metrics, channel)
    parts = makeSessionParts(
        config,
        reactor,
        extraCheckers,
        spool,
        limiter,
        lockout,
        limits,
        metrics,
        flow,
        RemoteAdmission(channel),
    )
    factories = {}
    for listenerIndex, fd in listeners:
        listener = config.listeners[listenerIndex]
        sessions, factory = makeListenerFactory(config, listener, parts)
        factories[listenerIndex] = sessions
        AdoptedListener(reactor, fd, factory).setServiceParent(top)
    SessionDrain(limiter, reactor).setServiceParent(top)
    relay = Relay.fromParts(config, extraCheckers, factories, parts, None)
    if running is not None:
        relay.apply(running)
        relay.install(running)
    Reloader(relay, NotifyService(Notifier({}), reactor), reactor).setServiceParent(top)
    StartupHeapFreezer(reactor).setServiceParent(top)
    return top


def parseArguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m smtpauth_relay.worker",
        description="An smtpauth-relay worker process (started by the relay).",
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[])
    parser.add_argument("--auth", action="append", default=[])
    parser.add_argument("--config-fd", type=int, default=None)
    return parser.parse_args(argv)


def readConfigs(path: str, fd: int | None) -> tuple[Config, Config | None]:
    """
    The configuration a worker starts with, and the one to switch to at
    once (or C{None}): from the main process's document on descriptor
    C{fd} (L{smtpauth_relay.workers.configDocument}: what it started with
    and what it runs now), else read from C{path}.  Blocking.

    @raise ConfigError: if either is invalid.
    """
    if fd is None:
        return loadConfig(path), None
    with os.fdopen(fd, "rb") as f:
        document = json.loads(f.read())
    started = parseConfig(document["started"], path)
    if document["running"] == document["started"]:
        return started, None
    return started, parseConfig(document["running"], path)


def listenerDescriptors(values: Sequence[str]) -> list[tuple[int, int]]:
    """
    C{["0:4", "1:5"]} to C{[(0, 4), (1, 5)]}.
    """
    result = []
    for value in values:
        index, fd = value.split(":", 1)
        result.append((int(index), int(fd)))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    args = parseArguments(sys.argv[1:] if argv is None else argv)
    try:
        config, running = readConfigs(args.config, args.config_fd)
    except ConfigError as e:
        raise SystemExit(
            f"smtpauth-relay worker {args.index}: invalid configuration:\n"
            + "\n".join(e.problems)
        ) from None
    observer: Any = (
        JSONLinesObserver(sys.stdout)
        if config.logging.format == "json"
        else textObserver(sys.stdout)
    )
    # Debug events are not written.
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                workerObserver(observer, args.index),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
            )
        ],
        redirectStandardIO=False,
    )
    from twisted.internet import reactor

    service = makeWorkerService(
        config,
        reactor,
        CHANNEL_FD,
        listenerDescriptors(args.listener),
        [strcred.makeChecker(a) for a in args.auth],
        args.index,
        running,
    )
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    log.info("worker {index} running (pid {pid})", index=args.index, pid=os.getpid())
    # From now on a reload reaches us (the main process waits for this to
    # pass one on).
    tell(service.channel, Ready)
    reactor.run()


if __name__ == "__main__":
    main()
