"""
Tests for the outbound ESMTP client and its connection pool, against a
scripted upstream in memory.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.delivery import client as clientModule
from smtpauth_relay.delivery.client import (
    ClientSettings,
    Outbound,
    RelayClientFactory,
    UpstreamError,
    mailFromParameters,
)
from smtpauth_relay.delivery.pool import ConnectionPool
from smtpauth_relay.envelope import DeliveryReport, Envelope
from tests.fakeupstream import FakeTLSContext, MemoryConnector, UpstreamScript


def envelope(queueId: str = "Q1", *recipients: str, **kw: Any) -> Envelope:
    fields: dict[str, Any] = dict(sender="alice@example.org", auth="alice")
    fields.update(kw)
    return Envelope(
        queueId=queueId, recipients=recipients or ("bob@example.net",), **fields
    )


class PoolTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.script = UpstreamScript()
        self.connector = MemoryConnector(self.script)

    def pool(self, **settings: Any) -> ConnectionPool:
        options: dict[str, Any] = dict(heloName="relay.example.org", host="upstream")
        options.update(settings)
        return ConnectionPool(
            RelayClientFactory(ClientSettings(**options)),
            self.connector,
            self.clock,
            maxConnections=2,
            linger=2.0,
            deadline=600.0,
        )

    def message(self, body: bytes = b"Subject: hi\n\nhello\n") -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(body)
        return path

    def send(
        self, pool: ConnectionPool, env: Envelope, body: bytes | None = None, **kw: Any
    ) -> Any:
        path = self.message(body) if body is not None else self.message()
        return pool.send(Outbound(env, path, **kw))


class DeliveryTests(PoolTestCase):
    def test_delivered(self) -> None:
        """
        A message is sent with MAIL FROM, RCPT, DATA; every recipient is
        reported delivered, and the body arrives with CRLF line endings.
        """
        pool = self.pool()
        d = self.send(pool, envelope("Q1", "bob@example.net", "carol@example.net"))
        self.connector.flush()
        report: DeliveryReport = self.successResultOf(d)
        self.assertEqual(report.delivered, ("bob@example.net", "carol@example.net"))
        self.assertEqual(report.host, "upstream")
        (transaction,) = self.script.transactions
        self.assertEqual(transaction.data, b"Subject: hi\r\n\r\nhello\r\n")
        self.assertEqual(
            transaction.recipients, [b"bob@example.net", b"carol@example.net"]
        )

    def test_mailFromParameters(self) -> None:
        """
        MAIL FROM carries SIZE, BODY=8BITMIME for 8-bit messages, and
        AUTH=<> when the upstream offers AUTH and the identity is not
        forwarded.
        """
        pool = self.pool()
        body = "Subject: x\n\nGrüße\n".encode()
        d = self.send(pool, envelope(body="8BITMIME"), body)
        self.connector.flush()
        self.successResultOf(d)
        self.assertEqual(
            self.script.transactions[0].mailFrom,
            b"MAIL FROM:<alice@example.org> SIZE=%d BODY=8BITMIME AUTH=<>" % len(body),
        )

    def test_forwardedIdentity(self) -> None:
        """
        With identity forwarding, AUTH= names the submitter, xtext-encoded.
        """
        pool = self.pool()
        d = self.send(pool, envelope(auth="al+ice=x"), forwardIdentity=True)
        self.connector.flush()
        self.successResultOf(d)
        self.assertTrue(
            self.script.transactions[0].mailFrom.endswith(b" AUTH=al+2Bice+3Dx")
        )

    def test_noAuthParameterWithoutAuthExtension(self) -> None:
        """
        An upstream that does not offer AUTH gets no AUTH= parameter at all.
        """
        self.script.extensions = [b"SIZE 1000000"]
        pool = self.pool()
        d = self.send(pool, envelope(), forwardIdentity=True)
        self.connector.flush()
        self.successResultOf(d)
        self.assertNotIn(b"AUTH=", self.script.transactions[0].mailFrom)

    def test_nullSender(self) -> None:
        """
        A bounce goes out with MAIL FROM:<>.
        """
        pool = self.pool()
        d = self.send(pool, envelope(sender="", auth="<>"))
        self.connector.flush()
        self.successResultOf(d)
        self.assertTrue(
            self.script.transactions[0].mailFrom.startswith(b"MAIL FROM:<> ")
        )

    def test_perRecipientResults(self) -> None:
        """
        Recipients accepted, refused temporarily and refused permanently at
        RCPT are reported apart: delivered, deferred (4xx) and failed (5xx).
        """
        pool = self.pool()
        d = self.send(
            pool,
            envelope(
                "Q1", "ok@example.net", "tempfail@example.net", "reject@example.net"
            ),
        )
        self.connector.flush()
        report = self.successResultOf(d)
        self.assertEqual(report.delivered, ("ok@example.net",))
        self.assertEqual(
            report.deferred, {"tempfail@example.net": "451 4.2.0 Try again later"}
        )
        self.assertEqual(
            report.failed, {"reject@example.net": "550 5.1.1 No such user"}
        )

    def test_noRecipientAccepted(self) -> None:
        """
        With no recipient accepted no message is sent (without PIPELINING,
        not even DATA); each recipient has its own RCPT reply.
        """
        pool = self.pool()
        d = self.send(pool, envelope("Q1", "reject@example.net"))
        self.connector.flush()
        report = self.successResultOf(d)
        self.assertEqual(
            report.failed, {"reject@example.net": "550 5.1.1 No such user"}
        )
        self.assertEqual(self.script.transactions, [])
        pipelined = b"PIPELINING" in self.script.extensions
        self.assertEqual(b"DATA" in self.script.commands, pipelined)

    def test_dataRefused(self) -> None:
        """
        A temporary failure after the data defers every accepted recipient,
        with that reply.
        """
        self.script.dataReply = b"451 4.3.0 Queue full"
        pool = self.pool()
        d = self.send(pool, envelope("Q1", "ok@example.net", "reject@example.net"))
        self.connector.flush()
        report = self.successResultOf(d)
        self.assertEqual(report.deferred, {"ok@example.net": "451 4.3.0 Queue full"})
        self.assertEqual(
            report.failed, {"reject@example.net": "550 5.1.1 No such user"}
        )

    def test_senderRefused(self) -> None:
        """
        A refused MAIL FROM is every recipient's answer.
        """
        self.script.mailReply = b"553 5.7.1 Sender not allowed"
        pool = self.pool()
        d = self.send(pool, envelope("Q1", "a@example.net", "b@example.net"))
        self.connector.flush()
        report = self.successResultOf(d)
        self.assertEqual(
            report.failed,
            {
                "a@example.net": "553 5.7.1 Sender not allowed",
                "b@example.net": "553 5.7.1 Sender not allowed",
            },
        )


class DotStuffingTests(PoolTestCase):
    def test_leadingDots(self) -> None:
        """
        Lines starting with a dot are stuffed and arrive intact.
        """
        pool = self.pool()
        body = b"Subject: x\n\n.one\n..two\n.\nend\n"
        d = self.send(pool, envelope(), body)
        self.connector.flush()
        self.successResultOf(d)
        self.assertEqual(
            self.script.transactions[0].data,
            b"Subject: x\r\n\r\n.one\r\n..two\r\n.\r\nend\r\n",
        )

    def test_dotAtChunkBoundary(self) -> None:
        """
        A line starting with a dot right at the boundary of the chunks the
        file is read in is stuffed too, so a lone "." there cannot end the
        message early (Twisted's client stuffs only within a chunk).
        """
        chunk = clientModule._ChunkSender.CHUNK_SIZE
        head = b"Subject: x\n\n"
        lines, rest = divmod(chunk - len(head), 1000)
        filler = (b"x" * 999 + b"\n") * lines + b"x" * (rest - 1) + b"\n"
        body = head + filler + b".\n" + b"after the dot\n"
        self.assertEqual(body[chunk : chunk + 1], b".")
        # Sent in chunks, as a message larger than SMALL_MESSAGE is.
        self.patch(clientModule, "SMALL_MESSAGE", 0)
        pool = self.pool()
        d = self.send(pool, envelope(), body)
        self.connector.flush()
        self.successResultOf(d)
        self.assertEqual(self.script.transactions[0].data, body.replace(b"\n", b"\r\n"))


class ReuseTests(PoolTestCase):
    def test_oneConnectionForSeveralMessages(self) -> None:
        """
        Messages queued together go over one connection, one transaction
        after the other (no RSET after a transaction that ended with the
        reply to its data), and the connection is closed with QUIT after the
        linger time.
        """
        pool = self.pool()
        pool.maxConnections = 1
        results = [self.send(pool, envelope(f"Q{i}")) for i in range(5)]
        self.connector.flush()
        for d in results:
            self.assertEqual(self.successResultOf(d).delivered, ("bob@example.net",))
        self.assertEqual(self.script.connections, 1)
        self.assertEqual(len(self.script.transactions), 5)
        self.assertEqual(self.script.commands.count(b"RSET"), 0)
        mails = [c for c in self.script.commands if c.startswith(b"MAIL FROM:")]
        self.assertEqual(len(mails), 5)
        self.assertNotIn(b"QUIT", self.script.commands)
        self.clock.advance(2)
        self.connector.flush()
        self.assertEqual(self.script.commands[-1], b"QUIT")
        self.assertEqual(pool.clients, set())

    def test_close(self) -> None:
        """
        Closing the pool (at shutdown) makes a lingering connection QUIT at
        once, and fires when no connection is left.
        """
        pool = self.pool()
        d = self.send(pool, envelope())
        self.connector.flush()
        self.successResultOf(d)
        closed = pool.close()
        self.connector.flush()
        self.successResultOf(closed)
        self.assertEqual(self.script.commands[-1], b"QUIT")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lingeringConnectionReused(self) -> None:
        """
        A message arriving while a connection lingers is sent over it,
        without a new connection.
        """
        pool = self.pool()
        first = self.send(pool, envelope("Q1"))
        self.connector.flush()
        self.successResultOf(first)
        self.clock.advance(1)
        second = self.send(pool, envelope("Q2"))
        self.connector.flush()
        self.successResultOf(second)
        self.assertEqual(self.script.connections, 1)

    def test_connectionLimit(self) -> None:
        """
        No more than C{maxConnections} connections are opened for a burst.
        """
        pool = self.pool()
        results = [self.send(pool, envelope(f"Q{i}")) for i in range(10)]
        self.assertEqual(pool.connectionsMade, 2)
        self.connector.flush()
        for d in results:
            self.successResultOf(d)
        self.assertEqual(self.script.connections, 2)

    def test_rsetRefusedEndsConnection(self) -> None:
        """
        A transaction that ends before the data (here: no recipient
        accepted) is followed by RSET.  An upstream refusing it gets the
        connection closed, not an endless RSET loop; the next message goes
        over a new connection.
        """
        self.script.rsetReply = b"500 5.5.1 What?"
        pool = self.pool()
        pool.maxConnections = 1
        first = self.send(pool, envelope("Q1"))
        second = self.send(pool, envelope("Q2", "reject@example.net"))
        third = self.send(pool, envelope("Q3"))
        self.connector.flush()
        self.assertEqual(self.successResultOf(first).delivered, ("bob@example.net",))
        self.assertEqual(self.successResultOf(second).delivered, ())
        self.assertEqual(self.successResultOf(third).delivered, ("bob@example.net",))
        self.assertEqual(self.script.commands.count(b"RSET"), 1)
        self.assertEqual(self.script.connections, 2)


class FailureTests(PoolTestCase):
    def test_connectionRefused(self) -> None:
        """
        A refused connection fails the waiting messages with
        L{UpstreamError} (a temporary failure for the queue).
        """
        self.connector.refuse = ConnectionRefusedError()
        pool = self.pool()
        d = self.send(pool, envelope())
        failure = self.failureResultOf(d, UpstreamError)
        self.assertEqual(failure.value.host, "upstream")
        self.assertIn("refused", str(failure.value))

    def test_deadline(self) -> None:
        """
        An upstream that never answers fails the message after the deadline
        (a temporary failure), and the silent connection is aborted after
        the reply timeout.
        """
        self.script.silent = True
        pool = self.pool()
        d = self.send(pool, envelope())
        self.connector.flush()
        self.assertNoResult(d)
        self.clock.advance(300)
        self.assertTrue(self.connector.pumps[0].clientIO.disconnecting)
        self.clock.advance(300)
        self.failureResultOf(d, UpstreamError)

    def test_deadlineDropsStuckConnections(self) -> None:
        """
        An upstream that accepts connections but never greets does not keep
        the pool full: when a waiting message's deadline passes, the
        connections that never got anywhere are aborted, so the next attempt
        connects afresh.
        """
        self.script.silent = True
        pool = self.pool()
        d = self.send(pool, envelope())
        self.connector.flush()
        self.assertEqual(len(pool.clients), 1)
        self.clock.advance(600)
        self.failureResultOf(d, UpstreamError)
        self.connector.flush()
        self.assertEqual(pool.clients, set())
        self.assertEqual(pool.waiting, deque())
        self.script.silent = False
        again = self.send(pool, envelope("Q2"))
        self.connector.flush()
        self.successResultOf(again)

    def test_deadlineDuringTransfer(self) -> None:
        """
        A message still not done at the deadline aborts the connection
        carrying it.
        """
        pool = self.pool()
        d = self.send(pool, envelope())
        self.connector.flush()
        self.successResultOf(d)
        self.script.silent = True
        slow = self.send(pool, envelope("Q2"))
        self.connector.flush()
        self.clock.advance(600)
        self.failureResultOf(slow, UpstreamError)
        self.assertTrue(self.connector.pumps[0].clientIO.disconnecting)

    def test_authentication(self) -> None:
        """
        With a username the client starts TLS, then logs in (AUTH PLAIN)
        before MAIL FROM.
        """
        self.script.users = {b"relay": b"s3cret"}
        self.script.tls = True
        pool = self.pool(
            username="relay",
            password=b"s3cret",
            startTLS=FakeTLSContext(),
            requireTLS=True,
        )
        d = self.send(pool, envelope())
        self.connector.flush()
        self.successResultOf(d)
        self.assertEqual(self.script.commands[1], b"STARTTLS")
        self.assertTrue(self.script.commands[3].startswith(b"AUTH PLAIN "))

    def test_tlsHandshakeFails(self) -> None:
        """
        A failed TLS handshake fails the waiting messages, without a
        reconnection loop and without sending anything in the clear.
        """
        self.script.tls = True
        self.script.tlsAccepts = False
        pool = self.pool(startTLS=FakeTLSContext(), requireTLS=True)
        first = self.send(pool, envelope("Q1"))
        second = self.send(pool, envelope("Q2"))
        self.connector.flush()
        self.failureResultOf(first, UpstreamError)
        self.failureResultOf(second, UpstreamError)
        self.assertEqual(self.script.transactions, [])
        self.assertLessEqual(self.script.connections, 2)

    def test_authenticationRefused(self) -> None:
        """
        Refused credentials fail the message (temporarily) and the pool does
        not reconnect in a loop.
        """
        self.script.users = {b"relay": b"other"}
        self.script.tls = True
        pool = self.pool(
            username="relay",
            password=b"s3cret",
            startTLS=FakeTLSContext(),
            requireTLS=True,
        )
        first = self.send(pool, envelope("Q1"))
        second = self.send(pool, envelope("Q2"))
        self.connector.flush()
        self.failureResultOf(first, UpstreamError)
        self.failureResultOf(second, UpstreamError)
        self.assertLessEqual(self.script.connections, 2)
        self.assertEqual(self.script.transactions, [])

    def test_noCredentialsWithoutTLS(self) -> None:
        """
        Credentials are never sent over a connection without TLS: with a
        username and an upstream that offers no STARTTLS, the message fails
        and no AUTH command is sent.
        """
        self.script.users = {b"relay": b"s3cret"}
        pool = self.pool(username="relay", password=b"s3cret", startTLS=object())
        d = self.send(pool, envelope())
        self.connector.flush()
        self.failureResultOf(d, UpstreamError)
        self.assertFalse(any(c.startswith(b"AUTH") for c in self.script.commands))

    def test_requiredTLSMissing(self) -> None:
        """
        With STARTTLS required and not offered, nothing is sent.
        """
        pool = self.pool(startTLS=object(), requireTLS=True)
        d = self.send(pool, envelope())
        self.connector.flush()
        self.failureResultOf(d, UpstreamError)
        self.assertEqual(self.script.transactions, [])

    def test_missingSpoolFile(self) -> None:
        """
        A spool file that vanished fails that message only; the next one
        on the connection is still sent.
        """
        pool = self.pool()
        pool.maxConnections = 1
        gone = pool.send(Outbound(envelope("Q1"), "/nonexistent/Q1.msg"))
        ok = self.send(pool, envelope("Q2"))
        self.connector.flush()
        self.failureResultOf(gone, UpstreamError)
        self.successResultOf(ok)


class MailFromParametersTests(SynchronousTestCase):
    def test_withoutExtensions(self) -> None:
        """
        No parameter is sent that the server did not offer.
        """
        outbound = Outbound(envelope(body="8BITMIME"), "x", forwardIdentity=True)
        self.assertEqual(mailFromParameters(outbound, {}, 10), b"")

    def test_nullIdentityNotForwarded(self) -> None:
        """
        An envelope whose AUTH is C{<>} is sent as AUTH=<> even when
        forwarding.
        """
        outbound = Outbound(envelope(auth="<>"), "x", forwardIdentity=True)
        self.assertEqual(
            mailFromParameters(outbound, {b"AUTH": b"PLAIN"}, 10), b" AUTH=<>"
        )


class MisbehavingUpstreamTests(PoolTestCase):
    def test_successInsteadOf354(self) -> None:
        """
        A 2xx reply to DATA (where 354 belongs) delivers nothing: the
        recipients are deferred, not reported delivered.
        """
        self.script.dataStartReply = b"250 2.0.0 Ok"
        pool = self.pool()
        d = self.send(pool, envelope())
        self.connector.flush()
        report = self.successResultOf(d)
        self.assertEqual(report.delivered, ())
        self.assertIn("bob@example.net", report.deferred)
        self.assertEqual(self.script.transactions, [])

    def test_successInsteadOf250ToMail(self) -> None:
        """
        A 251 to MAIL FROM is not taken as a delivery either.
        """
        self.script.mailReply = b"251 2.1.0 Ok"
        pool = self.pool()
        d = self.send(pool, envelope())
        self.connector.flush()
        report = self.successResultOf(d)
        self.assertEqual(report.delivered, ())
        self.assertIn("bob@example.net", report.deferred)

    def test_heloRefusedOnce(self) -> None:
        """
        A server refusing EHLO and HELO gets one HELO, not an endless loop;
        the message fails temporarily.
        """
        self.script.ehloReply = b"502 5.5.1 No EHLO"
        self.script.heloReply = b"502 5.5.1 No HELO either"
        pool = self.pool()
        d = self.send(pool, envelope())
        self.connector.flush()
        self.failureResultOf(d, UpstreamError)
        self.assertEqual(self.script.commands.count(b"HELO relay.example.org"), 1)

    def test_refusedCredentialsHoldDeliveries(self) -> None:
        """
        Refused credentials are tried once per connection (not in a second
        form), and deliveries to that upstream are held for a while instead
        of failing a login per queued message.
        """
        self.script.users = {b"relay": b"other"}
        self.script.tls = True
        pool = self.pool(
            username="relay",
            password=b"s3cret",
            startTLS=FakeTLSContext(),
            requireTLS=True,
        )
        d = self.send(pool, envelope())
        self.connector.flush()
        self.failureResultOf(d, UpstreamError)
        self.assertEqual(
            len([c for c in self.script.commands if c.startswith(b"AUTH")]), 1
        )
        connections = self.script.connections
        held = self.send(pool, envelope("Q2"))
        self.assertIn(
            "credentials", str(self.failureResultOf(held, UpstreamError).value)
        )
        self.assertEqual(self.script.connections, connections)
        self.clock.advance(pool.authHold)
        again = self.send(pool, envelope("Q3"))
        self.connector.flush()
        self.failureResultOf(again, UpstreamError)
        self.assertEqual(self.script.connections, connections + 1)

    def test_eightBitToSevenBitUpstream(self) -> None:
        """
        An 8-bit message is never sent to a server without 8BITMIME: it
        fails permanently (5.6.3) and the next message still goes.
        """
        self.script.extensions = [b"SIZE 1000000"]
        pool = self.pool()
        pool.maxConnections = 1
        eightBit = self.send(pool, envelope("Q1", body="8BITMIME"), "Grüße\n".encode())
        plain = self.send(pool, envelope("Q2"))
        self.connector.flush()
        report = self.successResultOf(eightBit)
        self.assertTrue(report.failed["bob@example.net"].startswith("554 5.6.3 "))
        self.successResultOf(plain)
        self.assertEqual(len(self.script.transactions), 1)

    def test_noAbortAfterFinalDot(self) -> None:
        """
        Once the final dot is sent, the deadline does not abort the
        connection: the upstream may already have the message, so its reply
        is awaited (for up to ten minutes).
        """
        self.script.holdDataReply = True
        pool = self.pool()
        d = self.send(pool, envelope())
        self.connector.flush()
        self.assertEqual(len(self.script.transactions), 1)
        self.clock.advance(599)
        self.connector.flush()
        self.assertNoResult(d)
        self.assertFalse(self.connector.pumps[0].clientIO.disconnecting)
        self.script.heldReplies[0]()
        self.connector.flush()
        self.assertEqual(self.successResultOf(d).delivered, ("bob@example.net",))

    def test_serviceClosing421(self) -> None:
        """
        A 421 from the upstream (closing) defers the message and does not
        make the pool open one connection per waiting message.
        """
        self.script.mailReply = b"421 4.3.2 Shutting down"
        pool = self.pool()
        pool.maxConnections = 1
        results = [self.send(pool, envelope(f"Q{i}")) for i in range(5)]
        self.connector.flush()
        for d in results:
            if d.called and not isinstance(d.result, DeliveryReport):
                self.failureResultOf(d, UpstreamError)
        self.assertLessEqual(self.script.connections, 2)


class PipelinedMixin:
    """
    The same tests against an upstream that offers PIPELINING (RFC 2920):
    MAIL, the RCPTs and DATA are sent together and their replies read in
    order.
    """

    script: UpstreamScript

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self.script.extensions.append(b"PIPELINING")


class PipelinedDeliveryTests(PipelinedMixin, DeliveryTests):
    pass


class PipelinedDotStuffingTests(PipelinedMixin, DotStuffingTests):
    pass


class PipelinedMisbehavingUpstreamTests(PipelinedMixin, MisbehavingUpstreamTests):
    pass


class PipeliningTests(PipelinedMixin, PoolTestCase):
    def test_roundTrips(self) -> None:
        """
        A message costs two round trips: MAIL, RCPTs and DATA in one write,
        then the message and its final dot in one write.  The next message
        follows without RSET.
        """
        pool = self.pool()
        pool.maxConnections = 1
        first = self.send(pool, envelope("Q1", "a@example.net", "b@example.net"))
        second = self.send(pool, envelope("Q2"))
        self.connector.flush()
        self.assertEqual(
            self.successResultOf(first).delivered, ("a@example.net", "b@example.net")
        )
        self.assertEqual(self.successResultOf(second).delivered, ("bob@example.net",))
        transactions = [c for c in self.script.chunks if c.startswith(b"MAIL ")]
        self.assertEqual(len(transactions), 2)
        self.assertRegex(
            transactions[0],
            rb"^MAIL FROM:<alice@example.org>[^\r]*\r\n"
            rb"RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n$",
        )
        bodies = [c for c in self.script.chunks if c.startswith(b"Subject:")]
        self.assertEqual(bodies, [b"Subject: hi\r\n\r\nhello\r\n.\r\n"] * 2)
        self.assertNotIn(b"RSET", self.script.commands)

    def test_withoutPipelining(self) -> None:
        """
        An upstream that does not offer PIPELINING gets one command at a
        time.
        """
        self.script.extensions.remove(b"PIPELINING")
        pool = self.pool()
        d = self.send(pool, envelope("Q1", "a@example.net", "b@example.net"))
        self.connector.flush()
        self.successResultOf(d)
        mail = [c for c in self.script.chunks if c.startswith(b"MAIL ")]
        self.assertEqual(len(mail), 1)
        self.assertNotIn(b"RCPT", mail[0])
        self.assertIn(b"RCPT TO:<a@example.net>\r\n", self.script.chunks)

    def test_dataOpenedForNobody(self) -> None:
        """
        An upstream that answers 354 although no recipient was accepted gets
        an empty message (a lone dot), the RCPT refusals are reported, and
        the connection goes on (after RSET) with the next message.
        """
        self.script.dataForNobody = True
        pool = self.pool()
        pool.maxConnections = 1
        refused = self.send(pool, envelope("Q1", "reject@example.net"))
        accepted = self.send(pool, envelope("Q2"))
        self.connector.flush()
        self.assertEqual(
            self.successResultOf(refused).failed,
            {"reject@example.net": "550 5.1.1 No such user"},
        )
        self.assertEqual(self.successResultOf(accepted).delivered, ("bob@example.net",))
        self.assertEqual(self.script.transactions[0].data, b"")
        self.assertEqual(self.script.commands.count(b"RSET"), 1)
        self.assertEqual(self.script.connections, 1)

    def test_senderRefusedThenNext(self) -> None:
        """
        After a refused MAIL the replies to the pipelined RCPTs and DATA
        are read and dropped; the next message starts cleanly after RSET.
        """
        self.script.mailReply = b"452 4.3.1 Insufficient system storage"
        pool = self.pool()
        pool.maxConnections = 1
        first = self.send(pool, envelope("Q1", "a@example.net"))
        self.connector.flush()
        self.assertEqual(
            self.successResultOf(first).deferred,
            {"a@example.net": "452 4.3.1 Insufficient system storage"},
        )
        self.script.mailReply = b"250 2.1.0 Ok"
        second = self.send(pool, envelope("Q2"))
        self.connector.flush()
        self.assertEqual(self.successResultOf(second).delivered, ("bob@example.net",))
        self.assertEqual(self.script.connections, 1)

    def test_largeMessageInChunks(self) -> None:
        """
        A message over SMALL_MESSAGE is sent in chunks, not read whole.
        """
        body = b"Subject: big\n\n" + (b"y" * 999 + b"\n") * 300
        self.assertGreater(len(body), clientModule.SMALL_MESSAGE)
        pool = self.pool()
        d = self.send(pool, envelope(), body)
        self.connector.flush()
        self.successResultOf(d)
        self.assertEqual(self.script.transactions[0].data, body.replace(b"\n", b"\r\n"))
        self.assertEqual(
            [c for c in self.script.chunks if c.startswith(b"Subject:")],
            [body[: clientModule._ChunkSender.CHUNK_SIZE].replace(b"\n", b"\r\n")],
        )
