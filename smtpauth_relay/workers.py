"""
Worker processes (C{[server] workers}): more processes taking SMTP sessions,
so that TLS and the SMTP dialogue use every core.

The main process listens, prepares and locks the spool, and starts
C{workers - 1} worker processes (L{smtpauth_relay.worker}) that inherit
its listening sockets: the kernel hands each new connection to whichever
process accepts it first, the main process included.  A worker writes the
messages it accepts into the shared spool, fsynced before its 250, and tells
the main process over its channel (L{smtpauth_relay.ipc}); the main
process's queue runner alone delivers, so no message goes out twice.  The
lockout, the rate limits, the connection counts and in-flow control live in
the main process and are asked over the same channel.

A worker that dies is started again (after a pause that grows while it keeps
dying); at shutdown each is sent SIGTERM, lets its sessions finish as the
main process does, and is killed if it has not ended after
L{WorkerSupervisor.grace} seconds.  A reload (SIGHUP) is passed on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import smtpauth_relay
from smtpauth_relay.config import MAX_WORKERS, Config
from smtpauth_relay.cpus import usableCpus
from smtpauth_relay.ipc import MainChannel

log = Logger()

#: Variables a worker must not see: systemd's, meant for the main process.
PRIVATE_ENVIRONMENT = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)

#: The first file descriptor of a worker's listening sockets; its channel is
#: descriptor 3.
CHANNEL_FD = 3
FIRST_LISTENER_FD = 4


#: The endpoint types whose listening sockets the workers share: plain
#: stream sockets.  Any other (C{ssl:}, a plugin's) may do more than accept
#: (TLS at the endpoint, say) that a worker adopting the bare socket would
#: not: its listener is served by the main process alone.
SHAREABLE_ENDPOINTS = frozenset({"tcp", "tcp6", "unix", "systemd"})


def shareable(endpoint: str) -> bool:
    """
    Whether the workers may share the listener of endpoint string
    C{endpoint} (see L{SHAREABLE_ENDPOINTS}).
    """
    return endpoint.split(":", 1)[0].strip().lower() in SHAREABLE_ENDPOINTS


def workerCount(config: Config, cpuCount: Callable[[], int] = usableCpus) -> int:
    """
    How many processes take sessions, the main one included: by default
    one per CPU this process may use (its affinity), at most
    L{MAX_WORKERS}.
    """
    return config.server.workers or max(1, min(cpuCount(), MAX_WORKERS))


def workerEnvironment(environ: Any = os.environ) -> dict[str, str]:
    """
    The environment of a worker: ours, without systemd's variables, and with
    this package importable.
    """
    env = {k: v for k, v in environ.items() if k not in PRIVATE_ENVIRONMENT}
    root = os.path.dirname(os.path.dirname(os.path.abspath(smtpauth_relay.__file__)))
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    return env


def workerCommand(
    configPath: str,
    index: int,
    listeners: Sequence[int],
    extraArguments: Sequence[str] = (),
    configFd: int | None = None,
) -> list[str]:
    """
    The command line of worker C{index}, whose listening sockets (by
    C{[[listener]]} index) are descriptors L{FIRST_LISTENER_FD} onwards,
    and who reads the main process's configuration from descriptor
    C{configFd} if given (see L{configDocument}).
    """
    command = [
        sys.executable,
        "-m",
        "smtpauth_relay.workerstart",
        str(os.getpid()),
        "--config",
        configPath,
        "--index",
        str(index),
    ]
    for n, listener in enumerate(listeners):
        command += ["--listener", f"{listener}:{FIRST_LISTENER_FD + n}"]
    if configFd is not None:
        command += ["--config-fd", str(configFd)]
    return command + list(extraArguments)


def configDocument(started: str, running: str) -> Any:
    """
    What the main process gives a worker to read at start: the
    configuration text it started with (the listeners, and whatever else
    needs a restart) and the one it runs now (after its reloads), so that
    a worker started again runs what the main process runs, even when the
    file has been edited since without a reload.

    @return: an unlinked temporary file holding them, at its start.
    """
    document = tempfile.TemporaryFile()
    document.write(json.dumps({"started": started, "running": running}).encode())
    document.seek(0)
    return document


def listeningPort(service: Any) -> Any:
    """
    The port of a started
    L{twisted.application.internet.StreamServerEndpointService}, or
    C{None} if it is not listening.
    """
    ports: list[Any] = []

    def found(port: Any) -> Any:
        ports.append(port)
        return port

    service._waitingForPort.addCallback(found)
    return ports[0] if ports else None


class _WorkerProcess(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred[None] = Deferred()
        self.started = supervisor.reactor.seconds()
        self.channel: MainChannel | None = None
        self.reloadPending = False
        """A reload was asked for before the worker was ready."""

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor._ended(self, reason)


class WorkerSupervisor(Service):
    """
    Starts the worker processes, starts again those that die, passes
    reloads on and stops them at shutdown.

    @ivar grace: seconds a stopping worker has before it is killed (its
        sessions get 10 to finish, as the main process's do).
    """

    grace = 15.0
    firstPause = 1.0
    longestPause = 30.0

    def __init__(
        self,
        reactor: Any,
        count: int,
        configPath: str,
        extraArguments: Sequence[str],
        listening: Sequence[tuple[int, Any]],
        makeChannel: Callable[[int], MainChannel],
        cleanUp: Callable[[int], Deferred[Any]] | None = None,
        configTexts: Callable[[], tuple[str, str]] | None = None,
    ) -> None:
        """
        @param count: how many workers (beside the main process).
        @param extraArguments: more worker arguments (C{--auth}).
        @param listening: C{(listener index, service)} of each listener: a
            L{twisted.application.internet.StreamServerEndpointService},
            listening once started.
        @param makeChannel: makes the main side of worker C{N}'s channel,
            given C{N}.
        @param cleanUp: called with C{N} when worker C{N} has ended while
            the relay runs (to take care of what it left); it is started
            again once the L{Deferred} this returns has fired.
        @param configTexts: the configuration text the main process
            started with and the one it runs now, for each worker started
            (L{configDocument}); without it a worker reads the file.
        """
        self.reactor = reactor
        self.count = count
        self.configPath = configPath
        self.extraArguments = list(extraArguments)
        self.listening = list(listening)
        self.makeChannel = makeChannel
        self.cleanUp = cleanUp
        self.configTexts = configTexts
        self.processes: dict[int, _WorkerProcess] = {}
        self._pauses: dict[int, float] = {}
        self._restarts: dict[int, Any] = {}
        self._sockets: list[tuple[int, int]] = []

    def startService(self) -> None:
        super().startService()
        self._sockets = []
        for index, service in self.listening:
            port = listeningPort(service)
            if port is None:
                raise RuntimeError(f"listener {index} is not listening")
            self._sockets.append((index, port.fileno()))
        for index in range(1, self.count + 1):
            self._start(index)

    def _start(self, index: int) -> None:
        self._restarts.pop(index, None)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        texts = self.configTexts() if self.configTexts is not None else None
        document = configDocument(*texts) if texts and texts[0] else None
        try:
            childFDs: dict[int, Any] = {1: 1, 2: 2, CHANNEL_FD: theirs.fileno()}
            for n, (_, fd) in enumerate(self._sockets):
                childFDs[FIRST_LISTENER_FD + n] = fd
            configFd = None
            if document is not None:
                configFd = FIRST_LISTENER_FD + len(self._sockets)
                childFDs[configFd] = document.fileno()
            process = _WorkerProcess(self, index)
            command = workerCommand(
                self.configPath,
                index,
                [listener for listener, _ in self._sockets],
                self.extraArguments,
                configFd,
            )
            self.reactor.spawnProcess(
                process,
                command[0],
                command,
                env=workerEnvironment(),
                childFDs=childFDs,
            )
            self.processes[index] = process
            channel = self.makeChannel(index)
            channel.onReady = lambda channel: self._ready(process)
            process.channel = channel
            self.reactor.adoptStreamConnection(
                mine.fileno(), socket.AF_UNIX, OneProtocolFactory(channel)
            )
        finally:
            mine.close()
            theirs.close()
            if document is not None:
                document.close()
        log.info(
            "started worker {index} (pid {pid})",
            index=index,
            pid=getattr(process.transport, "pid", None),
        )

    def _ended(self, process: _WorkerProcess, reason: Failure) -> None:
        index = process.index
        if self.processes.get(index) is process:
            del self.processes[index]
        if not self.running:
            # (What it left, the next start clears.)
            log.info("worker {index} stopped", index=index)
            return
        cleaned = (
            maybeDeferred(self.cleanUp, index)
            if self.cleanUp is not None
            else succeed(None)
        )
        cleaned.addErrback(
            lambda f: log.failure("cleaning up after worker {index}", f, index=index)
        )
        # A worker that ran a while starts again at once; one that keeps
        # dying waits longer each time.
        lived = self.reactor.seconds() - process.started
        pause = self._pauses.get(index, 0.0)
        pause = (
            self.firstPause
            if lived > 60 or not pause
            else min(pause * 2, self.longestPause)
        )
        self._pauses[index] = pause
        log.error(
            "worker {index} ended unexpectedly ({reason}); starting it again"
            " in {pause:.0f}s",
            index=index,
            reason=reason.getErrorMessage(),
            pause=pause,
        )

        def restart(ignored: object) -> None:
            # (Unless the relay stopped while the clean-up ran.)
            if self.running:
                self._restarts[index] = self.reactor.callLater(
                    pause, self._start, index
                )

        cleaned.addCallback(restart)

    def signal(self, signum: int) -> None:
        """
        Send C{signum} to every worker.
        """
        for process in list(self.processes.values()):
            self._signal(process, signum)

    def _signal(self, process: _WorkerProcess, signum: int) -> None:
        try:
            assert process.transport is not None
            process.transport.signalProcess(signum)
        except (ProcessExitedAlready, OSError):
            pass

    def reload(self) -> None:
        """
        Pass a reload on: each worker reads the configuration again; one
        still starting (that may have read it before it changed) does once
        it is ready.
        """
        for process in list(self.processes.values()):
            if process.channel is not None and process.channel.ready:
                self._signal(process, signal.SIGHUP)
            else:
                process.reloadPending = True

    def _ready(self, process: _WorkerProcess) -> None:
        log.info("worker {index} ready", index=process.index)
        if process.reloadPending:
            process.reloadPending = False
            self._signal(process, signal.SIGHUP)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        ended = [p.ended for p in self.processes.values()]
        if not ended:
            return DeferredList([])
        self.signal(signal.SIGTERM)
        kill = self.reactor.callLater(self.grace, self.signal, signal.SIGKILL)

        def done(result: object) -> object:
            if kill.active():
                kill.cancel()
            return result

        return DeferredList(ended).addBoth(done)


class OneProtocolFactory(Factory):
    """
    Hands out one protocol (for an adopted connection).
    """

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self._protocol
