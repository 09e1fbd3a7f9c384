"""
Tests for L{smtpauth_relay.control}: the control socket's line protocol,
driven with L{StringTransport} against a spy L{IQueueControl}, and its
service, started on a L{MemoryReactor}.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpauth_relay.control import (
    MAX_REQUEST_LENGTH,
    ControlFactory,
    ControlProtocol,
    ControlService,
    controlEndpointDescription,
    isQueueId,
    makeControlService,
    parseRequest,
)
from smtpauth_relay.envelope import Envelope
from smtpauth_relay.errors import QueueBusy
from smtpauth_relay.interfaces import IQueueControl
from smtpauth_relay.retry import QueueRunner
from smtpauth_relay.testing import MemorySpool, RecordingDeliveryAgent

QUEUE_ID = "018F2A3B4C5D6E7F8091A2B3C4D"


@implementer(IQueueControl)
class SpyQueueControl:
    """
    An L{IQueueControl} that records each call and returns a L{Deferred}
    the test fires itself.

    @ivar calls: C{(method, queueId)} for each call, in order.
    @ivar results: the L{Deferred} returned by each call, in order.
    @ivar flushResult: what C{flush} returns, if not a new L{Deferred}.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.results: list[Deferred[Any]] = []
        self.flushResult: Any = None

    def _call(self, method: str, queueId: str | None) -> Deferred[Any]:
        self.calls.append((method, queueId))
        d: Deferred[Any] = Deferred()
        self.results.append(d)
        return d

    def flush(self) -> Any:
        if self.flushResult is not None:
            self.calls.append(("flush", None))
            return self.flushResult
        return self._call("flush", None)

    def delete(self, queueId: str) -> Deferred[None]:
        return self._call("delete", queueId)

    def bounce(self, queueId: str) -> Deferred[None]:
        return self._call("bounce", queueId)


class ProtocolTests(SynchronousTestCase):
    """
    Tests for L{ControlProtocol}.
    """

    def setUp(self) -> None:
        self.connect()

    def connect(self) -> None:
        """
        A new connection, to a new spy and clock.
        """
        self.control = SpyQueueControl()
        self.clock = Clock()
        self.factory = ControlFactory(self.control, self.clock)
        protocol = self.factory.buildProtocol(None)
        assert protocol is not None
        self.protocol = protocol
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def reply(self) -> bytes:
        return self.transport.value()

    def test_spyProvidesInterface(self) -> None:
        """
        The spy used here provides L{IQueueControl}, so these tests use the
        seam the queue runner implements.
        """
        self.assertTrue(verifyObject(IQueueControl, self.control))

    def test_buildProtocol(self) -> None:
        """
        The factory builds L{ControlProtocol}s that know their factory.
        """
        self.assertIsInstance(self.protocol, ControlProtocol)
        self.assertIs(self.protocol.factory, self.factory)

    def test_flush(self) -> None:
        """
        C{FLUSH} asks the queue to flush and answers, once that is done,
        with the number of messages scheduled; then the connection closes.
        """
        self.protocol.dataReceived(b"FLUSH\n")
        self.assertEqual(self.control.calls, [("flush", None)])
        self.assertEqual(self.reply(), b"")
        self.assertFalse(self.transport.disconnecting)
        self.control.results[0].callback(7)
        self.assertEqual(self.reply(), b"OK 7 scheduled\n")
        self.assertTrue(self.transport.disconnecting)

    def test_flushReturningInt(self) -> None:
        """
        A C{flush} that returns its count directly (as L{IQueueControl}
        declares) is answered at once.
        """
        self.control.flushResult = 3
        self.protocol.dataReceived(b"FLUSH\n")
        self.assertEqual(self.reply(), b"OK 3 scheduled\n")
        self.assertTrue(self.transport.disconnecting)

    def test_delete(self) -> None:
        """
        C{DELETE ID} deletes that message and answers C{OK deleted ID} once
        the deletion is done.
        """
        self.protocol.dataReceived(f"DELETE {QUEUE_ID}\n".encode())
        self.assertEqual(self.control.calls, [("delete", QUEUE_ID)])
        self.assertEqual(self.reply(), b"")
        self.control.results[0].callback(None)
        self.assertEqual(self.reply(), f"OK deleted {QUEUE_ID}\n".encode())
        self.assertTrue(self.transport.disconnecting)

    def test_bounce(self) -> None:
        """
        C{BOUNCE ID} bounces that message and answers C{OK bounced ID} once
        that is done.
        """
        self.protocol.dataReceived(f"BOUNCE {QUEUE_ID}\n".encode())
        self.assertEqual(self.control.calls, [("bounce", QUEUE_ID)])
        self.assertEqual(self.reply(), b"")
        self.control.results[0].callback(None)
        self.assertEqual(self.reply(), f"OK bounced {QUEUE_ID}\n".encode())
        self.assertTrue(self.transport.disconnecting)

    def test_crlf(self) -> None:
        """
        A request ending in CRLF is accepted like one ending in LF.
        """
        self.protocol.dataReceived(f"DELETE {QUEUE_ID}\r\n".encode())
        self.assertEqual(self.control.calls, [("delete", QUEUE_ID)])

    def test_requestInPieces(self) -> None:
        """
        A request line may arrive in several packets.
        """
        self.protocol.dataReceived(b"DEL")
        self.protocol.dataReceived(f"ETE {QUEUE_ID[:5]}".encode())
        self.assertEqual(self.control.calls, [])
        self.protocol.dataReceived(f"{QUEUE_ID[5:]}\n".encode())
        self.assertEqual(self.control.calls, [("delete", QUEUE_ID)])

    def test_unknownMessage(self) -> None:
        """
        A C{KeyError} from C{delete} or C{bounce} is answered
        C{ERR unknown message ID}.
        """
        for command in ("DELETE", "BOUNCE"):
            self.connect()
            self.protocol.dataReceived(f"{command} {QUEUE_ID}\n".encode())
            self.control.results[0].errback(KeyError(QUEUE_ID))
            self.assertEqual(
                self.reply(), f"ERR unknown message {QUEUE_ID}\n".encode(), command
            )
            self.assertTrue(self.transport.disconnecting)

    def test_busy(self) -> None:
        """
        L{QueueBusy} from C{delete} or C{bounce} is answered
        C{ERR busy ID: being delivered, try again}.
        """
        for command in ("DELETE", "BOUNCE"):
            self.connect()
            self.protocol.dataReceived(f"{command} {QUEUE_ID}\n".encode())
            self.control.results[0].errback(QueueBusy(QUEUE_ID))
            self.assertEqual(
                self.reply(),
                f"ERR busy {QUEUE_ID}: being delivered, try again\n".encode(),
                command,
            )

    def test_internalError(self) -> None:
        """
        Any other failure is logged and answered C{ERR internal error},
        without details.
        """
        for command in ("FLUSH", f"DELETE {QUEUE_ID}", f"BOUNCE {QUEUE_ID}"):
            self.connect()
            self.protocol.dataReceived(f"{command}\n".encode())
            self.control.results[0].errback(RuntimeError("disk on fire"))
            self.assertEqual(self.reply(), b"ERR internal error\n", command)
            self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)

    def test_flushKeyErrorIsInternal(self) -> None:
        """
        A C{KeyError} from C{flush} (which names no message) is an internal
        error, not an unknown message.
        """
        self.protocol.dataReceived(b"FLUSH\n")
        self.control.results[0].errback(KeyError("x"))
        self.assertEqual(self.reply(), b"ERR internal error\n")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_synchronousException(self) -> None:
        """
        A control method that raises instead of failing its L{Deferred} is
        handled the same way.
        """

        def explode() -> int:
            raise ZeroDivisionError()

        self.control.flush = explode  # type: ignore[method-assign]
        self.protocol.dataReceived(b"FLUSH\n")
        self.assertEqual(self.reply(), b"ERR internal error\n")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_badRequests(self) -> None:
        """
        Unknown commands, wrong case, missing, extra or malformed arguments
        and non-ASCII bytes are answered C{ERR bad request}, and the queue
        is not touched.
        """
        requests = [
            b"",
            b"HELLO",
            b"flush",
            b"FLUSH now",
            b" FLUSH",
            b"DELETE",
            b"DELETE ",
            b"delete " + QUEUE_ID.encode(),
            b"DELETE " + QUEUE_ID.lower().encode(),
            b"DELETE  " + QUEUE_ID.encode(),
            b"DELETE " + QUEUE_ID.encode() + b" ",
            b"DELETE " + QUEUE_ID.encode() + b" X",
            b"DELETE ../../etc/passwd",
            b"BOUNCE 0123456789ABCDEG",
            b"BOUNCE " + b"A" * 9,
            b"BOUNCE " + b"A" * 41,
            b"BOUNCE \xc3\x84" + b"A" * 10,
            b"DELETE\t" + QUEUE_ID.encode(),
            b"DELETE " + QUEUE_ID.encode() + b"\x00",
        ]
        for request in requests:
            self.connect()
            self.protocol.dataReceived(request + b"\n")
            self.assertEqual(self.reply(), b"ERR bad request\n", request)
            self.assertTrue(self.transport.disconnecting, request)
            self.assertEqual(self.control.calls, [], request)

    def test_idBounds(self) -> None:
        """
        Queue ids of 10 and 40 upper-case hex digits are accepted.
        """
        for queueId in ("0123456789", "ABCDEF0123" * 4):
            self.connect()
            self.protocol.dataReceived(f"BOUNCE {queueId}\n".encode())
            self.assertEqual(self.control.calls, [("bounce", queueId)])

    def test_longLine(self) -> None:
        """
        A request line over 200 octets is answered C{ERR bad request} and
        the connection closes.
        """
        self.assertEqual(MAX_REQUEST_LENGTH, 200)
        self.protocol.dataReceived(b"F" * 201 + b"\n")
        self.assertEqual(self.reply(), b"ERR bad request\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.control.calls, [])

    def test_longLineWithoutEnd(self) -> None:
        """
        Up to 200 octets without a line end are waited on; the 201st is
        answered C{ERR bad request} at once, and what follows is ignored.
        """
        self.protocol.dataReceived(b"F" * 150)
        self.protocol.dataReceived(b"F" * 50)
        self.assertEqual(self.reply(), b"")
        self.assertFalse(self.transport.disconnecting)
        self.protocol.dataReceived(b"F")
        self.assertEqual(self.reply(), b"ERR bad request\n")
        self.assertTrue(self.transport.disconnecting)
        self.protocol.dataReceived(b"F" * 300 + b"\nFLUSH\n")
        self.assertEqual(self.reply(), b"ERR bad request\n")
        self.assertEqual(self.control.calls, [])

    def test_oneRequestPerConnection(self) -> None:
        """
        Only the first request line is acted on; what follows, in the same
        packet or later, is ignored.
        """
        self.protocol.dataReceived(f"FLUSH\nDELETE {QUEUE_ID}\n".encode())
        self.protocol.dataReceived(f"BOUNCE {QUEUE_ID}\n".encode() + b"X" * 500)
        self.assertEqual(self.control.calls, [("flush", None)])
        self.control.results[0].callback(2)
        self.assertEqual(self.reply(), b"OK 2 scheduled\n")

    def test_clientGoneBeforeReply(self) -> None:
        """
        A client that disconnects while its request is carried out gets
        nothing written; the action itself still completes.
        """
        self.protocol.dataReceived(f"DELETE {QUEUE_ID}\n".encode())
        self.protocol.connectionLost(None)
        self.transport.clear()
        self.control.results[0].callback(None)
        self.assertEqual(self.reply(), b"")

    def test_idleTimeout(self) -> None:
        """
        A client that sends no complete request within the factory's
        timeout is disconnected, without a reply.
        """
        self.clock.advance(self.factory.timeout - 1)
        self.assertFalse(self.transport.disconnecting)
        self.protocol.dataReceived(b"FLU")
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.reply(), b"")

    def test_noTimeoutWhileActing(self) -> None:
        """
        Once the request is in, the timeout no longer applies: a slow
        deletion is still answered.
        """
        self.protocol.dataReceived(f"DELETE {QUEUE_ID}\n".encode())
        self.clock.advance(self.factory.timeout * 10)
        self.assertFalse(self.transport.disconnecting)
        self.control.results[0].callback(None)
        self.assertEqual(self.reply(), f"OK deleted {QUEUE_ID}\n".encode())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeoutCancelledOnDisconnect(self) -> None:
        """
        A client that leaves leaves no timer behind.
        """
        self.protocol.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class QueueRunnerTests(SynchronousTestCase):
    """
    The protocol in front of the real L{QueueRunner}, the control the relay
    serves.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.spool = MemorySpool()
        self.spool.messages[QUEUE_ID] = (
            Envelope(
                queueId=QUEUE_ID,
                sender="alice@example.org",
                recipients=("bob@example.net",),
                nextAttempt=self.clock.seconds() + 600,
            ),
            b"Subject: x\n\nhello\n",
        )
        self.agent = RecordingDeliveryAgent()
        self.runner = QueueRunner(self.spool, self.agent, self.clock)
        self.runner.startService()
        self.factory = ControlFactory(self.runner, self.clock)

    def request(self, line: str) -> bytes:
        """
        Send one request line on a new connection; return what came back.
        """
        protocol = self.factory.buildProtocol(None)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(line.encode() + b"\n")
        return transport.value()

    def test_runnerProvidesInterface(self) -> None:
        """
        The queue runner provides L{IQueueControl}.
        """
        self.assertTrue(verifyObject(IQueueControl, self.runner))

    def test_flush(self) -> None:
        """
        C{FLUSH} schedules the waiting message at once.
        """
        self.assertEqual(self.request("FLUSH"), b"OK 1 scheduled\n")
        self.clock.advance(0)
        self.assertEqual(len(self.agent.calls), 1)

    def test_delete(self) -> None:
        """
        C{DELETE} of an idle message removes it from the spool.
        """
        self.assertEqual(
            self.request(f"DELETE {QUEUE_ID}"), f"OK deleted {QUEUE_ID}\n".encode()
        )
        self.assertEqual(self.spool.queued(), [])

    def test_busy(self) -> None:
        """
        A message being delivered is busy; it stays queued.
        """
        self.request("FLUSH")
        self.clock.advance(0)
        self.assertEqual(
            self.request(f"DELETE {QUEUE_ID}"),
            f"ERR busy {QUEUE_ID}: being delivered, try again\n".encode(),
        )
        self.assertEqual(self.spool.queued(), [QUEUE_ID])

    def test_unknown(self) -> None:
        """
        An id the spool does not hold is unknown.
        """
        self.assertEqual(
            self.request("BOUNCE 0123456789"), b"ERR unknown message 0123456789\n"
        )


class ParseTests(SynchronousTestCase):
    """
    Tests for L{parseRequest} and L{isQueueId}.
    """

    def test_parse(self) -> None:
        """
        The three requests parse into their command and queue id.
        """
        self.assertEqual(parseRequest(b"FLUSH"), ("FLUSH", None))
        self.assertEqual(
            parseRequest(b"DELETE " + QUEUE_ID.encode()), ("DELETE", QUEUE_ID)
        )
        self.assertEqual(
            parseRequest(b"BOUNCE " + QUEUE_ID.encode()), ("BOUNCE", QUEUE_ID)
        )

    def test_parseRejects(self) -> None:
        """
        Anything else raises L{ValueError}.
        """
        for line in (b"FLUSH\r", b"FLUSH ", b"DELETE x", b"\xff"):
            self.assertRaises(ValueError, parseRequest, line)

    def test_isQueueId(self) -> None:
        """
        A queue id is 10 to 40 upper-case hex digits and nothing else (no
        trailing newline either).
        """
        self.assertTrue(isQueueId(QUEUE_ID))
        for text in ("", "A" * 9, "A" * 41, QUEUE_ID + "\n", QUEUE_ID.lower(), "../x"):
            self.assertFalse(isQueueId(text), text)


class ServiceTests(SynchronousTestCase):
    """
    Tests for L{controlEndpointDescription} and L{makeControlService}.
    """

    def shortDirectory(self) -> str:
        """
        A new directory with a path short enough for a UNIX socket.
        """
        directory = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory)
        return directory

    def test_description(self) -> None:
        """
        The socket is C{control.sock} in the queue directory, mode 600,
        without Twisted's PID lock file.
        """
        self.assertEqual(
            controlEndpointDescription("/var/spool/smtpauth-relay"),
            "unix:/var/spool/smtpauth-relay/control.sock:mode=600:lockfile=0",
        )

    def test_descriptionQuoted(self) -> None:
        """
        Colons, equals signs and backslashes in the directory survive the
        endpoint syntax.
        """
        directory = "/srv/a:b=c\\d"
        endpoint = serverFromString(
            MemoryReactor(), controlEndpointDescription(directory)
        )
        self.assertIsInstance(endpoint, UNIXServerEndpoint)
        self.assertEqual(endpoint._address, directory + "/control.sock")
        self.assertEqual(endpoint._mode, 0o600)
        self.assertFalse(endpoint._wantPID)

    def test_listens(self) -> None:
        """
        Started, the service listens on the control socket with mode 600
        and a L{ControlFactory} for the given queue control.
        """
        reactor = MemoryReactor()
        control = SpyQueueControl()
        service = makeControlService("/var/spool/q", control, reactor)
        service.startService()
        self.assertEqual(len(reactor.unixServers), 1)
        address, factory, backlog, mode, wantPID = reactor.unixServers[0]
        self.assertEqual(
            (address, mode, wantPID), ("/var/spool/q/control.sock", 0o600, False)
        )
        self.assertIsInstance(factory, ControlFactory)
        self.assertIs(factory.control, control)
        self.assertIs(factory.clock, reactor)

    def test_removesStaleSocket(self) -> None:
        """
        A socket file left by a relay that did not stop cleanly is removed
        before listening.
        """
        directory = self.shortDirectory()
        path = os.path.join(directory, "control.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        service = makeControlService(directory, SpyQueueControl(), MemoryReactor())
        service.startService()
        self.assertFalse(os.path.lexists(path))

    def test_removesStaleSocketBeforePrivilegedListen(self) -> None:
        """
        twistd listens in C{privilegedStartService}: the stale socket is gone
        by then, and C{startService} afterwards listens no second time.
        """
        directory = self.shortDirectory()
        path = os.path.join(directory, "control.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        reactor = MemoryReactor()
        service = makeControlService(directory, SpyQueueControl(), reactor)
        service.privilegedStartService()
        self.assertFalse(os.path.lexists(path))
        self.assertEqual(len(reactor.unixServers), 1)
        service.startService()
        self.assertEqual(len(reactor.unixServers), 1)

    def test_keepsOtherFiles(self) -> None:
        """
        A file at the socket's path that is not a socket is left alone (the
        listen then fails and says so).
        """
        directory = self.shortDirectory()
        path = os.path.join(directory, "control.sock")
        with open(path, "w") as f:
            f.write("mine")
        service = ControlService(path)
        service.startService()
        with open(path) as f:
            self.assertEqual(f.read(), "mine")
