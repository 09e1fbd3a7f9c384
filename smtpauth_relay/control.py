"""
The control socket: how C{smtpauth-relay queue} asks the running relay to
act on its queue, so that an admin command never races the daemon's own
work on the spool.

The relay listens on C{control.sock} in the queue directory (a UNIX socket,
mode 600: only the relay's user and root may connect).  Each connection
carries one request line and gets one reply line, then the relay closes it::

    FLUSH         ->  OK 12 scheduled
    DELETE ID     ->  OK deleted ID
    BOUNCE ID     ->  OK bounced ID
    LOCKOUTS      ->  OK [{"key": "ip:192.0.2.7", "until": 1800000900.0}, ...]
    UNLOCK TARGET ->  OK unlocked 2   (an address, subnet or user name)

Errors::

    ERR unknown message ID
    ERR busy ID: being delivered, try again
    ERR bad request
    ERR internal error

Lines end with LF (a CR before it is ignored).  A request longer than
L{MAX_REQUEST_LENGTH} octets, or with a malformed queue id, is a bad
request.  The actions themselves belong to an
L{smtpauth_relay.interfaces.IQueueControl} (the queue runner).
"""

from __future__ import annotations

import json
import os
import re
import stat
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from smtpauth_relay.errors import QueueBusy
from smtpauth_relay.interfaces import IQueueControl
from smtpauth_relay.lockout import Lockout

__all__ = [
    "CONTROL_SOCKET",
    "MAX_REQUEST_LENGTH",
    "ControlFactory",
    "ControlProtocol",
    "ControlService",
    "controlEndpointDescription",
    "controlSocketPath",
    "isQueueId",
    "makeControlService",
    "parseRequest",
]

log = Logger()

CONTROL_SOCKET = "control.sock"
"""The name of the control socket in the queue directory."""

MAX_REQUEST_LENGTH = 200
"""The longest request line accepted, in octets, without its line end."""

_QUEUE_ID = re.compile(r"[0-9A-F]{10,40}")
_TARGET = re.compile(r"[\x21-\x7e]{1,128}")

BAD_REQUEST = "ERR bad request"
INTERNAL_ERROR = "ERR internal error"


def isQueueId(text: str) -> bool:
    """
    Whether C{text} has the form of a queue id (upper-case hex, 10 to 40
    characters); nothing else is ever used in a file name or passed on.
    """
    return _QUEUE_ID.fullmatch(text) is not None


def parseRequest(line: bytes) -> tuple[str, str | None]:
    """
    Parse one request line (without its line end).

    @return: the command (C{"FLUSH"}, C{"DELETE"}, C{"BOUNCE"},
        C{"LOCKOUTS"} or C{"UNLOCK"}) and its argument (a queue id, an
        unlock target, or C{None}).
    @raise ValueError: if C{line} is not a valid request.
    """
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("not ASCII") from None
    if text in ("FLUSH", "LOCKOUTS"):
        return text, None
    command, space, argument = text.partition(" ")
    if command in ("DELETE", "BOUNCE") and space and isQueueId(argument):
        return command, argument
    if command == "UNLOCK" and space and _TARGET.fullmatch(argument):
        return command, argument
    raise ValueError(f"bad request {text!r}")


def controlSocketPath(queueDirectory: str) -> str:
    """
    The path of the control socket of the spool in C{queueDirectory}.
    """
    return os.path.join(queueDirectory, CONTROL_SOCKET)


def _quote(argument: str) -> str:
    """
    Quote C{argument} for an endpoint description: C{\\}, C{:} and C{=} are
    escaped with a backslash.
    """
    return re.sub(r"([\\:=])", r"\\\1", argument)


def controlEndpointDescription(queueDirectory: str) -> str:
    """
    The server endpoint description of the control socket:
    C{unix:QUEUE_DIRECTORY/control.sock:mode=600:lockfile=0}.

    No Twisted lock file (C{lockfile=0}): its PID check would refuse to
    listen after a C{kill -9} whenever the dead relay's PID has been reused
    (always, in a container where the relay is PID 1).  The spool's own
    lock already guarantees a single relay per queue directory, and
    L{ControlService} removes a stale socket before listening.
    """
    return f"unix:{_quote(controlSocketPath(queueDirectory))}:mode=600:lockfile=0"


class ControlProtocol(LineOnlyReceiver, TimeoutMixin):
    """
    One control connection: one request line, one reply line, close.

    Input after the request line is ignored.  A client that sends no
    complete line within L{ControlFactory.timeout} seconds is disconnected.
    Once the request is received the action runs to its end even if the
    client goes away.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST_LENGTH
    factory: ControlFactory
    transport: Any

    def __init__(self) -> None:
        self._requested = False
        self._lost = False

    def callLater(self, period: float, func: Any) -> Any:
        """
        Schedule the idle timeout on the factory's clock.
        """
        return self.factory.clock.callLater(period, func)

    def connectionMade(self) -> None:
        self.setTimeout(self.factory.timeout)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        self.setTimeout(None)

    def timeoutConnection(self) -> None:
        """
        No request in time: close.
        """
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._requested:
            return
        super().dataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        if not self._requested:
            self._requested = True
            self.setTimeout(None)
            self._reply(BAD_REQUEST, request=None, queueId=None)

    def lineReceived(self, line: bytes) -> None:
        if self._requested:
            return
        self._requested = True
        self.setTimeout(None)
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            command, queueId = parseRequest(line)
        except ValueError:
            self._reply(BAD_REQUEST, request=None, queueId=None)
            return
        d = Deferred.fromCoroutine(self._perform(command, queueId))
        d.addCallback(self._reply, request=command, queueId=queueId)
        d.addErrback(
            lambda f: log.failure(
                "control request {request} failed", f, request=command
            )
        )

    async def _perform(self, command: str, queueId: str | None) -> str:
        """
        Ask the queue to carry out a parsed request.

        @return: the reply line.
        """
        control = self.factory.control
        lockout = self.factory.lockout
        if command in ("LOCKOUTS", "UNLOCK"):
            if lockout is None:
                return "ERR lockout is not enabled"
            if command == "UNLOCK":
                assert queueId is not None
                return f"OK unlocked {lockout.clear(queueId)}"
            locks = [{"key": lock.key, "until": lock.until} for lock in lockout.locks()]
            return "OK " + json.dumps(locks, ensure_ascii=True)
        if command == "FLUSH":
            try:
                count = int(await maybeDeferred(control.flush))
            except Exception:
                log.failure("control request {request} failed", request=command)
                return INTERNAL_ERROR
            return f"OK {count} scheduled"
        assert queueId is not None
        try:
            if command == "DELETE":
                await maybeDeferred(control.delete, queueId)
                return f"OK deleted {queueId}"
            await maybeDeferred(control.bounce, queueId)
            return f"OK bounced {queueId}"
        except KeyError:
            return f"ERR unknown message {queueId}"
        except QueueBusy:
            return f"ERR busy {queueId}: being delivered, try again"
        except Exception:
            log.failure(
                "control request {request} {queueId} failed",
                request=command,
                queueId=queueId,
            )
            return INTERNAL_ERROR

    def _reply(self, reply: str, request: str | None, queueId: str | None) -> None:
        """
        Send C{reply} (if the client is still there) and close.
        """
        if request is None:
            log.warn("control: bad request refused")
        else:
            log.info(
                "control: {request} {queueId}: {reply}",
                request=request,
                queueId=queueId or "",
                reply=reply,
            )
        if self._lost:
            return
        self.sendLine(reply.encode("ascii"))
        self.transport.loseConnection()


class ControlFactory(Factory[ControlProtocol]):
    """
    Builds L{ControlProtocol}s for one L{IQueueControl}.

    @ivar control: what the requests act on.
    @ivar clock: the L{IReactorTime} for the idle timeout.
    @ivar timeout: seconds a client has to send its request line.
    """

    protocol = ControlProtocol
    noisy = False
    timeout = 30.0

    def __init__(
        self, control: IQueueControl, clock: Any, lockout: Lockout | None = None
    ) -> None:
        self.control = control
        self.clock = clock
        self.lockout = lockout


class ControlService(MultiService):
    """
    Serves the control socket: removes a stale socket file left by a relay
    that did not stop cleanly, then listens (through its child, the
    endpoint service).

    Only run it while holding the spool's lock
    (L{smtpauth_relay.spool.Spool.prepare}): that lock is what makes sure
    no other relay is using the socket about to be removed.

    @ivar socketPath: the file system path of the socket.
    """

    def __init__(self, socketPath: str) -> None:
        super().__init__()
        self.socketPath = socketPath
        self._cleared = False

    def _removeStaleSocket(self) -> None:
        self._cleared = True
        try:
            if stat.S_ISSOCK(os.lstat(self.socketPath).st_mode):
                os.unlink(self.socketPath)
                log.info("removed stale control socket {path}", path=self.socketPath)
        except FileNotFoundError:
            pass

    def privilegedStartService(self) -> None:
        # twistd listens here, before dropping privileges.
        self._removeStaleSocket()
        super().privilegedStartService()

    def startService(self) -> None:
        if not self._cleared:
            self._removeStaleSocket()
        super().startService()


def makeControlService(
    queueDirectory: str,
    control: IQueueControl,
    reactor: Any,
    lockout: Lockout | None = None,
) -> IService:
    """
    The service serving the control socket of the queue in C{queueDirectory}.

    A failure to listen (for instance a queue directory path too long for a
    UNIX socket, over about 94 characters) fails the relay's start.

    @param control: what the requests act on (the queue runner).
    @param reactor: the reactor to listen with, also the timeout clock.
    """
    service = ControlService(controlSocketPath(queueDirectory))
    factory = ControlFactory(control, reactor, lockout)
    strports.service(
        controlEndpointDescription(queueDirectory), factory, reactor
    ).setServiceParent(service)
    return service
