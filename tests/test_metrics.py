"""
Tests for L{smtpauth_relay.metrics}: each L{RelayMetrics} method moves its
series (read back from the instance's own registry), the reply-to-label
mappings, the queue gauges computed at scrape time, and the HTTP service
scraped over a real loopback socket and parsed with prometheus-client's own
parsers.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openMetricsFamilies,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from smtpauth_relay import replies
from smtpauth_relay.metrics import (
    AUTH_RESULTS,
    DELIVERY_LATENCY_BUCKETS,
    DELIVERY_RESULTS,
    LOCKOUT_KINDS,
    OTHER,
    REFUSAL_REASONS,
    REJECTION_REASONS,
    RelayMetrics,
    makeMetricsService,
    queueIdTime,
    queueSnapshot,
    refusalReason,
    rejectionReason,
    upstreamLabel,
)
from smtpauth_relay.replies import Reply
from smtpauth_relay.spool import newQueueId

P = "smtpauth_relay_"

#: The label every 4xx/5xx reply of L{smtpauth_relay.replies} gets from
#: L{rejectionReason}.  A reply added there must be classified here.
EXPECTED_REJECTION_REASONS = {
    "EXPN": OTHER,
    "UNKNOWN_COMMAND": OTHER,
    "LINE_TOO_LONG": OTHER,
    "SYNTAX": OTHER,
    "BAD_SEQUENCE": OTHER,
    "HELO_FIRST": OTHER,
    "EHLO_FIRST": OTHER,
    "NESTED_MAIL": OTHER,
    "NEED_MAIL": OTHER,
    "NEED_RCPT": OTHER,
    "NO_VALID_RECIPIENTS": OTHER,
    "NOT_IMPLEMENTED": OTHER,
    "BAD_SENDER_SYNTAX": OTHER,
    "BAD_RECIPIENT_SYNTAX": OTHER,
    "UNKNOWN_PARAMETER": OTHER,
    "TOO_MANY_RECIPIENTS": "too_many_recipients",
    "TOO_BIG": "size",
    "DATA_LINE_TOO_LONG": "line_too_long",
    "TOO_MANY_HOPS": "loop",
    "BARE_LINE_ENDING": "bare_lf",
    "TOO_MANY_ERRORS": "session_limit",
    "TLS_NOT_AVAILABLE": OTHER,
    "TLS_ALREADY": OTHER,
    "TLS_TOO_OLD": "session_limit",
    "AUTH_FAILED": OTHER,
    "AUTH_BAD_BASE64": OTHER,
    "AUTH_ABORTED": OTHER,
    "AUTH_ALREADY": OTHER,
    "AUTH_IN_TRANSACTION": OTHER,
    "AUTH_UNKNOWN_MECHANISM": OTHER,
    "AUTH_REQUIRED": "auth_required",
    "SENDER_NOT_ALLOWED": "sender_not_allowed",
    "HEADER_FROM_NOT_ALLOWED": "header_from_not_allowed",
    "AUTH_NEEDS_TLS": OTHER,
    "AUTH_UNAVAILABLE": OTHER,
    "AUTH_NOT_AVAILABLE": OTHER,
    "AUTH_LOCKED": OTHER,
    "TOO_MANY_AUTH_FAILURES": "session_limit",
    "SPOOL_FAILED": "spool_error",
    "SPOOL_FULL": "spool_full",
    "TOO_MANY_CONNECTIONS": "session_limit",
    "TOO_MANY_CONNECTIONS_RATE": "session_limit",
    "TOO_MANY_MESSAGES_IN_SESSION": "session_limit",
    "MESSAGE_RATE": "rate",
    "RECIPIENT_RATE": "rate",
    "TOO_MANY_FROM_ADDRESS": "session_limit",
    "IDLE_TIMEOUT": OTHER,
    "SESSION_TOO_LONG": OTHER,
    "SHUTTING_DOWN": OTHER,
}


def errorReplies() -> dict[str, Reply]:
    """
    Every 4xx and 5xx reply L{smtpauth_relay.replies} defines, by name.
    """
    return {
        name: value
        for name, value in vars(replies).items()
        if isinstance(value, Reply) and value.code >= 400
    }


class RelayMetricsTests(SynchronousTestCase):
    """
    Each method of L{RelayMetrics} moves exactly its series.
    """

    def setUp(self) -> None:
        self.metrics = RelayMetrics()

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(P + name, labels)

    def test_ownRegistry(self) -> None:
        """
        Each instance counts in its own registry, and nothing reaches
        prometheus-client's process-wide default registry.
        """
        other = RelayMetrics()
        self.metrics.messageAccepted(10)
        self.assertEqual(self.value("messages_accepted_total"), 1.0)
        self.assertEqual(
            other.registry.get_sample_value(P + "messages_accepted_total"), 0.0
        )
        self.assertIsNone(REGISTRY.get_sample_value(P + "messages_accepted_total"))

    def test_connectionOpenedAndClosed(self) -> None:
        """
        L{RelayMetrics.connectionOpened} raises the listener's open gauge and
        counts the connection by listener and TLS mode;
        L{RelayMetrics.connectionClosed} lowers only the gauge.
        """
        m = self.metrics
        m.connectionOpened("tcp:587", "starttls")
        m.connectionOpened("tcp:587", "starttls")
        m.connectionOpened("ssl:465", "implicit")
        self.assertEqual(self.value("connections_open", listener="tcp:587"), 2.0)
        self.assertEqual(self.value("connections_open", listener="ssl:465"), 1.0)
        m.connectionClosed("tcp:587")
        self.assertEqual(self.value("connections_open", listener="tcp:587"), 1.0)
        self.assertEqual(
            self.value("connections_total", listener="tcp:587", tls="starttls"), 2.0
        )
        self.assertEqual(
            self.value("connections_total", listener="ssl:465", tls="implicit"), 1.0
        )

    def test_unknownTLSMode(self) -> None:
        """
        A TLS mode outside C{starttls}, C{implicit} and C{none} is counted as
        C{other}.
        """
        self.metrics.connectionOpened("tcp:25", "tls1.3")
        self.assertEqual(
            self.value("connections_total", listener="tcp:25", tls=OTHER), 1.0
        )

    def test_connectionRefused(self) -> None:
        """
        L{RelayMetrics.connectionRefused} counts by reason; every reason
        starts at 0, and an unknown one counts as C{other}.
        """
        for reason in REFUSAL_REASONS:
            self.assertEqual(self.value("connections_refused_total", reason=reason), 0)
        self.metrics.connectionRefused("rate")
        self.metrics.connectionRefused("rate")
        self.metrics.connectionRefused("because")
        self.assertEqual(self.value("connections_refused_total", reason="rate"), 2.0)
        self.assertEqual(self.value("connections_refused_total", reason=OTHER), 1.0)

    def test_refusalReason(self) -> None:
        """
        L{refusalReason} tells the connection limiter's and the connection
        rate limit's 421 replies apart, though they share 421 4.7.0.
        """
        self.assertEqual(refusalReason(replies.TOO_MANY_CONNECTIONS), "max_connections")
        self.assertEqual(
            refusalReason(replies.TOO_MANY_FROM_ADDRESS), "max_per_address"
        )
        self.assertEqual(refusalReason(replies.TOO_MANY_CONNECTIONS_RATE), "rate")
        self.assertEqual(refusalReason(replies.SHUTTING_DOWN), "shutting_down")
        self.assertEqual(refusalReason(replies.TOO_MANY_ERRORS), OTHER)

    def test_authAttempt(self) -> None:
        """
        L{RelayMetrics.authAttempt} counts by mechanism and result; every
        result of PLAIN and LOGIN starts at 0, and the mechanism is matched
        case-insensitively.
        """
        for mechanism in ("PLAIN", "LOGIN"):
            for result in AUTH_RESULTS:
                self.assertEqual(
                    self.value(
                        "auth_attempts_total", mechanism=mechanism, result=result
                    ),
                    0.0,
                )
        for result in AUTH_RESULTS:
            self.metrics.authAttempt("PLAIN", result)
        self.metrics.authAttempt("login", "failure")
        for result in AUTH_RESULTS:
            self.assertEqual(
                self.value("auth_attempts_total", mechanism="PLAIN", result=result),
                1.0,
            )
        self.assertEqual(
            self.value("auth_attempts_total", mechanism="LOGIN", result="failure"),
            1.0,
        )

    def test_authLabelsBounded(self) -> None:
        """
        An unknown mechanism or result is counted as C{other}, so a client
        cannot create series.
        """
        self.metrics.authAttempt("X-" + "A" * 50, "success")
        self.metrics.authAttempt("PLAIN", "maybe")
        self.assertEqual(
            self.value("auth_attempts_total", mechanism=OTHER, result="success"), 1.0
        )
        self.assertEqual(
            self.value("auth_attempts_total", mechanism="PLAIN", result=OTHER), 1.0
        )

    def test_lockoutStarted(self) -> None:
        """
        L{RelayMetrics.lockoutStarted} counts by kind; every kind starts at
        0.
        """
        for kind in LOCKOUT_KINDS:
            self.assertEqual(self.value("lockouts_total", kind=kind), 0.0)
        self.metrics.lockoutStarted("net")
        self.metrics.lockoutStarted("bogus")
        self.assertEqual(self.value("lockouts_total", kind="net"), 1.0)
        self.assertEqual(self.value("lockouts_total", kind="ip"), 0.0)
        self.assertEqual(self.value("lockouts_total", kind=OTHER), 1.0)

    def test_messageAccepted(self) -> None:
        """
        L{RelayMetrics.messageAccepted} counts the message and adds its size
        to the bytes counter.
        """
        self.metrics.messageAccepted(1000)
        self.metrics.messageAccepted(234)
        self.assertEqual(self.value("messages_accepted_total"), 2.0)
        self.assertEqual(self.value("message_bytes_total"), 1234.0)

    def test_messageRejected(self) -> None:
        """
        L{RelayMetrics.messageRejected} counts by reason; every reason starts
        at 0, and an unknown one counts as C{other}.
        """
        for reason in REJECTION_REASONS:
            self.assertEqual(self.value("messages_rejected_total", reason=reason), 0)
        self.metrics.messageRejected("size")
        self.metrics.messageRejected("spam")
        self.assertEqual(self.value("messages_rejected_total", reason="size"), 1.0)
        self.assertEqual(self.value("messages_rejected_total", reason=OTHER), 1.0)

    def test_rejectionReasonEveryReply(self) -> None:
        """
        L{rejectionReason} maps every 4xx and 5xx reply of
        L{smtpauth_relay.replies} to its label; the table above lists each
        one, so a new reply must be classified.
        """
        found = errorReplies()
        self.assertEqual(
            sorted(set(found) ^ set(EXPECTED_REJECTION_REASONS)),
            [],
            "replies added to or removed from smtpauth_relay.replies: "
            "classify them in EXPECTED_REJECTION_REASONS",
        )
        got = {
            name: rejectionReason(reply.code, reply.enhanced)
            for name, reply in found.items()
        }
        self.assertEqual(got, EXPECTED_REJECTION_REASONS)

    def test_rejectionReasonRelayDenied(self) -> None:
        """
        The RCPT refusal the server builds in place (554 5.7.1 Relay access
        denied) is C{relay_denied}.
        """
        self.assertEqual(rejectionReason(554, "5.7.1"), "relay_denied")

    def test_rejectionReasonsAreLabels(self) -> None:
        """
        Every label L{rejectionReason} gives is one
        L{RelayMetrics.messageRejected} counts as itself, and every
        rejection reason is given for some reply.
        """
        given = {rejectionReason(r.code, r.enhanced) for r in errorReplies().values()}
        given.add(rejectionReason(554, "5.7.1"))
        self.assertEqual(given - {OTHER}, set(REJECTION_REASONS))

    def test_deliveryAttempt(self) -> None:
        """
        L{RelayMetrics.deliveryAttempt} counts C{count} recipients by result
        and upstream host.
        """
        for result in DELIVERY_RESULTS:
            self.metrics.deliveryAttempt(result, "smtp.example.net")
        self.metrics.deliveryAttempt("delivered", "smtp.example.net", count=3)
        self.metrics.deliveryAttempt("lost", "smtp.example.net")
        for result in DELIVERY_RESULTS:
            self.assertEqual(
                self.value(
                    "delivery_attempts_total",
                    result=result,
                    upstream="smtp.example.net",
                ),
                4.0 if result == "delivered" else 1.0,
            )
        self.assertEqual(
            self.value(
                "delivery_attempts_total", result=OTHER, upstream="smtp.example.net"
            ),
            1.0,
        )

    def test_upstreamLabel(self) -> None:
        """
        L{upstreamLabel} keeps the host name of a report's host: without the
        address or port the delivery agents add, lower-cased; address
        literals are kept, an empty host is C{none}, several hosts are
        C{multiple}.
        """
        cases = {
            "smtp.example.net": "smtp.example.net",
            "MX1.Example.NET[192.0.2.1]": "mx1.example.net",
            "mx1.example.net[2001:db8::1]": "mx1.example.net",
            "smtp.example.net:587": "smtp.example.net",
            "[192.0.2.9]": "[192.0.2.9]",
            "maildir:/var/mail/relay": "maildir:/var/mail/relay",
            "": "none",
            "mx1.example.net[192.0.2.1], mx1.example.net[192.0.2.2]": "mx1.example.net",
            "mx1.example.net[192.0.2.1], mx.example.org[198.51.100.1]": "multiple",
        }
        self.assertEqual({host: upstreamLabel(host) for host in cases}, cases)

    def test_upstreamsCapped(self) -> None:
        """
        Past C{maxUpstreams} distinct upstream hosts, new ones are counted as
        C{other}; the ones already seen keep their own series.
        """
        metrics = RelayMetrics(maxUpstreams=2)
        for host in ("a.example", "b.example", "c.example", "a.example"):
            metrics.deliveryAttempt("delivered", host)

        def count(upstream: str) -> float | None:
            return metrics.registry.get_sample_value(
                P + "delivery_attempts_total",
                {"result": "delivered", "upstream": upstream},
            )

        self.assertEqual(count("a.example"), 2.0)
        self.assertEqual(count("b.example"), 1.0)
        self.assertIsNone(count("c.example"))
        self.assertEqual(count(OTHER), 1.0)

    def test_deliveryLatency(self) -> None:
        """
        L{RelayMetrics.deliveryLatency} observes seconds in a histogram whose
        buckets run from 0.1 s to a day; a negative time (clock step) counts
        as 0.
        """
        self.assertEqual(DELIVERY_LATENCY_BUCKETS[0], 0.1)
        self.assertEqual(DELIVERY_LATENCY_BUCKETS[-1], 86400.0)
        self.assertEqual(
            list(DELIVERY_LATENCY_BUCKETS), sorted(DELIVERY_LATENCY_BUCKETS)
        )
        for seconds in (0.05, 3.0, 1000.0, 200000.0, -1.0):
            self.metrics.deliveryLatency(seconds)
        name = "delivery_latency_seconds"
        self.assertEqual(self.value(name + "_count"), 5.0)
        self.assertEqual(self.value(name + "_sum"), 0.05 + 3.0 + 1000.0 + 200000.0)
        self.assertEqual(self.value(name + "_bucket", le="0.1"), 2.0)
        self.assertEqual(self.value(name + "_bucket", le="5.0"), 3.0)
        self.assertEqual(self.value(name + "_bucket", le="1800.0"), 4.0)
        self.assertEqual(self.value(name + "_bucket", le="86400.0"), 4.0)
        self.assertEqual(self.value(name + "_bucket", le="+Inf"), 5.0)


class QueueGaugeTests(SynchronousTestCase):
    """
    The queue gauges come from the source at each scrape.
    """

    def setUp(self) -> None:
        self.metrics = RelayMetrics()

    def scrape(self) -> dict[str, float]:
        """
        Collect the registry once; return the unlabelled samples by name.
        """
        return {
            sample.name: sample.value
            for family in self.metrics.registry.collect()
            for sample in family.samples
            if not sample.labels
        }

    def value(self, name: str) -> float | None:
        return self.scrape().get(P + name)

    def test_computedAtScrape(self) -> None:
        """
        The source is asked once per collection, not when it is set, and the
        gauges show its latest answer.
        """
        answers = [(3, 120.0), (0, 0.0)]
        calls: list[None] = []

        def source() -> tuple[int, float]:
            calls.append(None)
            return answers[len(calls) - 1]

        self.metrics.setQueueSource(source)
        self.assertEqual(calls, [])
        for depth, age in answers:
            samples = self.scrape()
            self.assertEqual(
                (
                    samples[P + "queue_messages"],
                    samples[P + "queue_oldest_age_seconds"],
                ),
                (depth, age),
            )
        self.assertEqual(len(calls), 2)

    def test_noSource(self) -> None:
        """
        Without a source the queue families are exposed without samples.
        """
        self.assertIsNone(self.value("queue_messages"))
        names = {family.name for family in self.metrics.registry.collect()}
        self.assertIn(P + "queue_messages", names)
        self.assertIn(P + "queue_oldest_age_seconds", names)

    def test_sourceRemoved(self) -> None:
        """
        C{setQueueSource(None)} removes the source.
        """
        self.metrics.setQueueSource(lambda: (1, 1.0))
        self.metrics.setQueueSource(None)
        self.assertIsNone(self.value("queue_messages"))

    def test_failingSource(self) -> None:
        """
        A source that raises is logged, and the rest of the scrape goes on.
        """

        def source() -> tuple[int, float]:
            raise ZeroDivisionError()

        self.metrics.setQueueSource(source)
        self.metrics.messageAccepted(5)
        samples = self.scrape()
        self.assertNotIn(P + "queue_messages", samples)
        self.assertEqual(samples[P + "messages_accepted_total"], 1.0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_negativeAge(self) -> None:
        """
        An age below 0 (a message queued "in the future" after a clock step)
        is shown as 0.
        """
        self.metrics.setQueueSource(lambda: (1, -5.0))
        self.assertEqual(self.value("queue_oldest_age_seconds"), 0.0)

    def test_queueIdTime(self) -> None:
        """
        L{queueIdTime} reads the millisecond time
        L{smtpauth_relay.spool.newQueueId} puts at the start of a queue id,
        and gives C{None} for an id without one.
        """
        self.assertEqual(queueIdTime(newQueueId(1_800_000_000.25)), 1_800_000_000.25)
        self.assertIsNone(queueIdTime("not-a-queue-id"))
        self.assertIsNone(queueIdTime(""))

    def test_queueSnapshot(self) -> None:
        """
        L{queueSnapshot} counts every id and ages the oldest one it can date;
        an empty queue is C{(0, 0.0)}.
        """
        ids = [
            newQueueId(1_800_000_100.0),
            newQueueId(1_800_000_000.0),
            "unreadable",
        ]
        self.assertEqual(queueSnapshot(ids, 1_800_000_600.0), (3, 600.0))
        self.assertEqual(queueSnapshot([], 1_800_000_600.0), (0, 0.0))
        self.assertEqual(queueSnapshot(["unreadable"], 1_800_000_600.0), (1, 0.0))
        self.assertEqual(queueSnapshot(ids, 1_799_999_000.0), (3, 0.0))


def listeningPort(service: Any) -> Deferred[Any]:
    """
    The port a started C{strports.service} listens on.  Twisted has no
    public accessor; C{_waitingForPort} has been its attribute since 10.2.
    """
    d: Deferred[Any] = service._waitingForPort
    return d


class MetricsServiceTests(TestCase):
    """
    L{makeMetricsService} on a real loopback socket, fetched with a real
    HTTP client and parsed with prometheus-client's parsers.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.metrics = RelayMetrics()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=pool)
        self.addCleanup(pool.closeCachedConnections)

    async def start(self) -> str:
        """
        Start the service on a free port; return its base URL.
        """
        service = makeMetricsService(
            "tcp:0:interface=127.0.0.1", self.metrics, self.reactor
        )
        self.assertTrue(verifyObject(IService, service))
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        port = await listeningPort(service)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def get(
        self, url: str, accept: str | None = None
    ) -> tuple[int, str | None, str]:
        """
        GET C{url}; return the status, content type and body.
        """
        headers = Headers({b"Accept": [accept.encode()]} if accept else {})
        response = await self.agent.request(b"GET", url.encode(), headers)
        body = await readBody(response)
        types = response.headers.getRawHeaders(b"content-type")
        return response.code, types[0].decode() if types else None, body.decode()

    def exercise(self) -> None:
        """
        One of everything, with known values.
        """
        m = self.metrics
        m.connectionOpened("tcp:587", "starttls")
        m.connectionOpened("tcp:587", "starttls")
        m.connectionOpened("ssl:465", "implicit")
        m.connectionClosed("tcp:587")
        m.connectionRefused(refusalReason(replies.TOO_MANY_FROM_ADDRESS))
        m.authAttempt("PLAIN", "success")
        m.authAttempt("LOGIN", "failure")
        m.authAttempt("LOGIN", "failure")
        m.lockoutStarted("ip")
        m.messageAccepted(2048)
        m.messageRejected(
            rejectionReason(replies.TOO_BIG.code, replies.TOO_BIG.enhanced)
        )
        m.deliveryAttempt("delivered", "smtp.example.net[192.0.2.1]", count=2)
        m.deliveryAttempt("deferred", "smtp.example.net")
        m.deliveryLatency(0.5)
        m.deliveryLatency(4000.0)
        m.setQueueSource(lambda: (7, 3600.0))

    async def test_scrape(self) -> None:
        """
        C{GET /metrics} answers 200 in the Prometheus text format, with the
        values of what the relay counted, and without C{_created} series.
        """
        self.exercise()
        base = await self.start()
        code, contentType, body = await self.get(base + "/metrics")
        self.assertEqual(code, 200)
        assert contentType is not None
        self.assertTrue(contentType.startswith("text/plain"), contentType)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }

        def value(name: str, **labels: str) -> float | None:
            return samples.get((P + name, tuple(sorted(labels.items()))))

        self.assertEqual(value("connections_open", listener="tcp:587"), 1.0)
        self.assertEqual(value("connections_open", listener="ssl:465"), 1.0)
        self.assertEqual(
            value("connections_total", listener="tcp:587", tls="starttls"), 2.0
        )
        self.assertEqual(
            value("connections_refused_total", reason="max_per_address"), 1.0
        )
        self.assertEqual(
            value("auth_attempts_total", mechanism="LOGIN", result="failure"), 2.0
        )
        self.assertEqual(
            value("auth_attempts_total", mechanism="PLAIN", result="success"), 1.0
        )
        self.assertEqual(value("lockouts_total", kind="ip"), 1.0)
        self.assertEqual(value("messages_accepted_total"), 1.0)
        self.assertEqual(value("message_bytes_total"), 2048.0)
        self.assertEqual(value("messages_rejected_total", reason="size"), 1.0)
        self.assertEqual(
            value(
                "delivery_attempts_total",
                result="delivered",
                upstream="smtp.example.net",
            ),
            2.0,
        )
        self.assertEqual(
            value(
                "delivery_attempts_total",
                result="deferred",
                upstream="smtp.example.net",
            ),
            1.0,
        )
        self.assertEqual(value("delivery_latency_seconds_count"), 2.0)
        self.assertEqual(value("delivery_latency_seconds_bucket", le="1.0"), 1.0)
        self.assertEqual(value("queue_messages"), 7.0)
        self.assertEqual(value("queue_oldest_age_seconds"), 3600.0)
        self.assertEqual([k for k in samples if k[0].endswith("_created")], [])

    async def test_queueAtEachScrape(self) -> None:
        """
        Each scrape asks the queue source afresh.
        """
        depths = iter([(2, 10.0), (5, 70.0)])
        self.metrics.setQueueSource(lambda: next(depths))
        base = await self.start()
        seen = []
        for _ in range(2):
            _, _, body = await self.get(base + "/metrics")
            for family in text_string_to_metric_families(body):
                if family.name == P + "queue_messages":
                    seen.append(family.samples[0].value)
        self.assertEqual(seen, [2.0, 5.0])

    async def test_openMetrics(self) -> None:
        """
        A scraper that asks for OpenMetrics gets it, and it parses.
        """
        self.exercise()
        base = await self.start()
        code, contentType, body = await self.get(
            base + "/metrics",
            accept="application/openmetrics-text; version=1.0.0,text/plain;q=0.5",
        )
        self.assertEqual(code, 200)
        assert contentType is not None
        self.assertTrue(
            contentType.startswith("application/openmetrics-text"), contentType
        )
        families = {f.name: f for f in openMetricsFamilies(body)}
        accepted = families[P + "messages_accepted"]
        self.assertEqual(accepted.type, "counter")
        self.assertEqual(
            [(s.name, s.value) for s in accepted.samples],
            [(P + "messages_accepted_total", 1.0)],
        )

    async def test_notFound(self) -> None:
        """
        Anything but C{/metrics} is 404.
        """
        base = await self.start()
        for path in ("/", "/metrics/", "/metrics/x", "/favicon.ico"):
            code, _, _ = await self.get(base + path)
            self.assertEqual(code, 404, path)

    def test_portInUse(self) -> None:
        """
        A port that cannot be bound fails startup instead of leaving the
        relay running without metrics.
        """
        busy = self.reactor.listenTCP(
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        self.addCleanup(busy.stopListening)
        service = makeMetricsService(
            f"tcp:{busy.getHost().port}:interface=127.0.0.1",
            self.metrics,
            self.reactor,
        )
        self.assertRaises(CannotListenError, service.privilegedStartService)
