"""
Prometheus metrics (C{[metrics] endpoint}): what the relay counts, and the
HTTP service that serves it in the Prometheus text format.

L{RelayMetrics} holds every series in its own L{CollectorRegistry} (never
the process-wide default one), so each relay, and each test, has its own
numbers.  The relay's parts call its methods as things happen; the queue
gauges are computed when Prometheus scrapes, from the callable given to
L{RelayMetrics.setQueueSource}.

Every label is bounded: values outside a method's documented set are
counted as C{"other"} rather than raising, because counting must never
break a session or a delivery.  Listener labels are endpoint descriptions
from the configuration; upstream labels are host names (addresses in
brackets and ports dropped), at most L{MAX_UPSTREAMS} of them.

The series, all prefixed C{smtpauth_relay_}::

    connections_open{listener}                    gauge
    connections_total{listener,tls}               counter
    connections_refused_total{reason}             counter
    auth_attempts_total{mechanism,result}         counter
    lockouts_total{kind}                          counter
    messages_accepted_total                       counter
    message_bytes_total                           counter
    messages_rejected_total{reason}               counter
    delivery_attempts_total{result,upstream}      counter
    delivery_latency_seconds                      histogram
    queue_messages                                gauge (at scrape time)
    queue_oldest_age_seconds                      gauge (at scrape time)
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from twisted.application import strports
from twisted.application.service import IService
from twisted.logger import Logger
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from smtpauth_relay import replies
from smtpauth_relay.interfaces import ISessionMetrics
from smtpauth_relay.replies import Reply
from smtpauth_relay.sasl import MECHANISMS

__all__ = [
    "AUTH_RESULTS",
    "DELIVERY_LATENCY_BUCKETS",
    "DELIVERY_RESULTS",
    "LOCKOUT_KINDS",
    "MAX_UPSTREAMS",
    "OTHER",
    "PREFIX",
    "REFUSAL_REASONS",
    "REJECTION_REASONS",
    "TLS_MODES",
    "MetricsPage",
    "RelayMetrics",
    "makeMetricsService",
    "queueIdTime",
    "queueSnapshot",
    "refusalReason",
    "rejectionReason",
    "upstreamLabel",
]

log = Logger()

PREFIX = "smtpauth_relay_"
"""The prefix of every metric name."""

OTHER = "other"
"""The label value for anything outside a label's documented set."""

TLS_MODES = ("starttls", "implicit", "none")
"""Values of the C{tls} label: the listener's C{[[listener]] tls}."""

AUTH_RESULTS = ("success", "failure", "locked", "unavailable")
"""Values of the C{result} label of AUTH attempts."""

LOCKOUT_KINDS = ("ip", "user", "net")
"""Values of the C{kind} label of lockouts (see L{smtpauth_relay.lockout})."""

DELIVERY_RESULTS = ("delivered", "deferred", "failed", "bounced", "expired")
"""Values of the C{result} label of delivery attempts."""

REFUSAL_REASONS = ("max_connections", "max_per_address", "rate", "shutting_down")
"""Values of the C{reason} label of refused connections."""

REJECTION_REASONS = (
    "size",
    "line_too_long",
    "bare_lf",
    "loop",
    "sender_not_allowed",
    "header_from_not_allowed",
    "relay_denied",
    "auth_required",
    "too_many_recipients",
    "rate",
    "session_limit",
    "spool_error",
    "spool_full",
)
"""Values of the C{reason} label of rejected messages (besides L{OTHER})."""

MAX_UPSTREAMS = 100
"""
Distinct C{upstream} label values kept; later ones are counted as
L{OTHER} (MX delivery talks to as many hosts as there are destinations).
"""

DELIVERY_LATENCY_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    43200.0,
    86400.0,
)
"""
Upper bounds, in seconds, of the delivery latency histogram: from a fast
smarthost (well under a second) through the retry schedule (minutes to
hours) to a day; anything later falls in C{+Inf}.
"""

_REJECTIONS: dict[tuple[int, str | None], str] = {
    (replies.TOO_BIG.code, replies.TOO_BIG.enhanced): "size",
    (
        replies.DATA_LINE_TOO_LONG.code,
        replies.DATA_LINE_TOO_LONG.enhanced,
    ): "line_too_long",
    (replies.BARE_LINE_ENDING.code, replies.BARE_LINE_ENDING.enhanced): "bare_lf",
    (replies.TOO_MANY_HOPS.code, replies.TOO_MANY_HOPS.enhanced): "loop",
    (
        replies.SENDER_NOT_ALLOWED.code,
        replies.SENDER_NOT_ALLOWED.enhanced,
    ): "sender_not_allowed",
    (
        replies.HEADER_FROM_NOT_ALLOWED.code,
        replies.HEADER_FROM_NOT_ALLOWED.enhanced,
    ): "header_from_not_allowed",
    # The RCPT refusal server.py builds in place: "554 5.7.1 Relay access denied".
    (554, "5.7.1"): "relay_denied",
    (replies.AUTH_REQUIRED.code, replies.AUTH_REQUIRED.enhanced): "auth_required",
    (
        replies.TOO_MANY_RECIPIENTS.code,
        replies.TOO_MANY_RECIPIENTS.enhanced,
    ): "too_many_recipients",
    # MESSAGE_RATE and RECIPIENT_RATE share 451 4.7.1.
    (replies.MESSAGE_RATE.code, replies.MESSAGE_RATE.enhanced): "rate",
    (
        replies.TOO_MANY_MESSAGES_IN_SESSION.code,
        replies.TOO_MANY_MESSAGES_IN_SESSION.enhanced,
    ): "session_limit",
    (replies.SPOOL_FAILED.code, replies.SPOOL_FAILED.enhanced): "spool_error",
    (replies.SPOOL_FULL.code, replies.SPOOL_FULL.enhanced): "spool_full",
}

_REFUSALS: dict[Reply, str] = {
    replies.TOO_MANY_CONNECTIONS: "max_connections",
    replies.TOO_MANY_FROM_ADDRESS: "max_per_address",
    replies.TOO_MANY_CONNECTIONS_RATE: "rate",
    replies.SHUTTING_DOWN: "shutting_down",
}

_ADDRESS_SUFFIX = re.compile(r"\[[^\]]*\]$")
_PORT_SUFFIX = re.compile(r":\d+$")
_QUEUE_ID_TIME = re.compile(r"[0-9A-Fa-f]{11}")


def rejectionReason(code: int, enhanced: str | None) -> str:
    """
    The C{reason} label for a refusal of a message or of its transaction,
    from the reply given (see L{smtpauth_relay.replies}).

    @param code: the reply's basic code, e.g. C{552}.
    @param enhanced: its enhanced status code, e.g. C{"5.3.4"}.
    @return: one of L{REJECTION_REASONS}, or L{OTHER} for a reply that is
        not a message refusal (a syntax error, say).
    """
    return _REJECTIONS.get((code, enhanced), OTHER)


def refusalReason(reply: Reply) -> str:
    """
    The C{reason} label for a connection refused with C{reply} as soon as it
    was made (L{smtpauth_relay.server.ConnectionLimiter.open} and the
    connection rate limit).

    @return: one of L{REFUSAL_REASONS}, or L{OTHER}.
    """
    return _REFUSALS.get(reply, OTHER)


def upstreamLabel(host: str) -> str:
    """
    The C{upstream} label for the C{host} of a
    L{smtpauth_relay.envelope.DeliveryReport}: the host name, lower-cased,
    without the C{[address]} or C{:port} the delivery agents add; C{"none"}
    when there is none (the connection failed before one was chosen);
    C{"multiple"} when the report names several hosts (an MX delivery to
    several domains).  A bracketed address literal is kept as it is.
    """
    names = []
    for part in host.split(","):
        name = part.strip().lower()
        if not name.startswith("["):
            name = _PORT_SUFFIX.sub("", _ADDRESS_SUFFIX.sub("", name))
        if name and name not in names:
            names.append(name)
    if not names:
        return "none"
    if len(names) > 1:
        return "multiple"
    return names[0][:253]


def queueIdTime(queueId: str) -> float | None:
    """
    When a message was queued, read from its queue id (whose first 11 hex
    digits are milliseconds since the epoch; see
    L{smtpauth_relay.spool.newQueueId}): no disk access.

    @return: POSIX time, or C{None} if C{queueId} does not start with one.
    """
    if _QUEUE_ID_TIME.match(queueId) is None:
        return None
    return int(queueId[:11], 16) / 1000.0


def queueSnapshot(queueIds: Iterable[str], now: float) -> tuple[int, float]:
    """
    The queue gauges from the ids of the queued messages: a ready-made body
    for the callable given to L{RelayMetrics.setQueueSource}.

    The age of a message is counted from its queue id, which is made when
    the client sends DATA: at most a few seconds before the envelope's
    C{receivedAt}.

    @param queueIds: the queued messages' ids.
    @param now: the current POSIX time.
    @return: C{(depth, oldestAgeSeconds)}; the age is C{0.0} for an empty
        queue, and never negative.
    """
    depth = 0
    oldest: float | None = None
    for queueId in queueIds:
        depth += 1
        queued = queueIdTime(queueId)
        if queued is not None and (oldest is None or queued < oldest):
            oldest = queued
    if oldest is None:
        return depth, 0.0
    return depth, max(0.0, now - oldest)


QueueSource = Callable[[], tuple[int, float]]
"""
Returns C{(depth, oldestAgeSeconds)} of the queue; called on the reactor
thread at each scrape, so it must be quick and must not touch the disk.
"""


class _QueueCollector:
    """
    The queue gauges, computed at scrape time from a L{QueueSource}.

    With no source, or when the source raises, the families are exposed
    without samples (the failure is logged): a scrape never fails because
    of them.
    """

    def __init__(self) -> None:
        self.source: QueueSource | None = None

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                PREFIX + "queue_messages",
                "Messages in the queue (accepted, not yet delivered or bounced).",
            ),
            GaugeMetricFamily(
                PREFIX + "queue_oldest_age_seconds",
                "Age of the oldest queued message, in seconds (0 when empty).",
                unit="seconds",
            ),
        )

    def describe(self) -> list[Metric]:
        """
        The families this collector exposes (for the registry's name
        checks).
        """
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        """
        Ask the source, and expose its answer.
        """
        depth, oldest = self._families()
        source = self.source
        if source is not None:
            try:
                count, age = source()
            except Exception:
                log.failure("queue metrics source failed")
            else:
                depth.add_metric([], float(count))
                oldest.add_metric([], max(0.0, float(age)))
        yield depth
        yield oldest


@implementer(ISessionMetrics)
class RelayMetrics:
    """
    The relay's Prometheus metrics, in a registry of their own.

    Build one per relay (in L{smtpauth_relay.service.makeRelayService}) and
    pass it to whatever counts; building one is cheap, so a relay whose
    C{[metrics] endpoint} is empty can still count into one nobody reads.

    @ivar registry: the L{CollectorRegistry} holding every series; serve it
        with L{makeMetricsService}, read it in tests with
        C{registry.get_sample_value(name, labels)}.
    """

    def __init__(self, maxUpstreams: int = MAX_UPSTREAMS) -> None:
        """
        @param maxUpstreams: distinct C{upstream} label values kept before
            further ones count as L{OTHER}.
        """
        self.registry = CollectorRegistry()
        self._maxUpstreams = maxUpstreams
        self._upstreams: set[str] = set()
        registry = self.registry
        self._connectionsOpen = Gauge(
            PREFIX + "connections_open",
            "SMTP connections open now, by listener.",
            ["listener"],
            registry=registry,
        )
        self._connections = Counter(
            PREFIX + "connections",
            "SMTP connections accepted, by listener and its TLS mode.",
            ["listener", "tls"],
            registry=registry,
        )
        self._refused = Counter(
            PREFIX + "connections_refused",
            "SMTP connections refused with 421 on arrival, by reason.",
            ["reason"],
            registry=registry,
        )
        self._auth = Counter(
            PREFIX + "auth_attempts",
            "AUTH attempts that reached a verdict, by mechanism and result.",
            ["mechanism", "result"],
            registry=registry,
        )
        self._lockouts = Counter(
            PREFIX + "lockouts",
            "Lockouts started, by kind (ip, user, net).",
            ["kind"],
            registry=registry,
        )
        self._accepted = Counter(
            PREFIX + "messages_accepted",
            "Messages accepted and queued (250 after DATA).",
            registry=registry,
        )
        self._bytes = Counter(
            PREFIX + "message_bytes",
            "Octets of the messages accepted, as spooled.",
            registry=registry,
        )
        self._rejected = Counter(
            PREFIX + "messages_rejected",
            "Messages or mail transactions refused, by reason.",
            ["reason"],
            registry=registry,
        )
        self._deliveries = Counter(
            PREFIX + "delivery_attempts",
            "Recipients' delivery attempt outcomes, by result and upstream host.",
            ["result", "upstream"],
            registry=registry,
        )
        self._latency = Histogram(
            PREFIX + "delivery_latency_seconds",
            "Seconds from acceptance to delivery, per delivered recipient.",
            buckets=DELIVERY_LATENCY_BUCKETS,
            registry=registry,
        )
        self._queue = _QueueCollector()
        registry.register(self._queue)
        # Series that exist from the start, at 0, so that rate() and
        # increase() see their first event.
        for reason in REFUSAL_REASONS:
            self._refused.labels(reason)
        for mechanism in MECHANISMS:
            for result in AUTH_RESULTS:
                self._auth.labels(mechanism, result)
        for kind in LOCKOUT_KINDS:
            self._lockouts.labels(kind)
        for reason in REJECTION_REASONS:
            self._rejected.labels(reason)

    # -- sessions -------------------------------------------------------------

    def connectionOpened(self, listener: str, tls: str) -> None:
        """
        An SMTP connection was made, refused or not (a refused one is also
        given to L{connectionRefused}); pair with L{connectionClosed}.

        @param listener: the listener's endpoint description, as configured.
        @param tls: the listener's TLS mode, one of L{TLS_MODES}.
        """
        if tls not in TLS_MODES:
            tls = OTHER
        self._connectionsOpen.labels(listener).inc()
        self._connections.labels(listener, tls).inc()

    def connectionClosed(self, listener: str) -> None:
        """
        A connection given to L{connectionOpened} was lost; call exactly once
        per opened connection.

        @param listener: the same endpoint description as when it opened.
        """
        self._connectionsOpen.labels(listener).dec()

    def connectionRefused(self, reason: str) -> None:
        """
        A connection was refused with a 421 as soon as it was made.

        @param reason: one of L{REFUSAL_REASONS}; L{refusalReason} gives it
            from the reply.
        """
        if reason not in REFUSAL_REASONS:
            reason = OTHER
        self._refused.labels(reason).inc()

    # -- authentication -------------------------------------------------------

    def authAttempt(self, mechanism: str, result: str) -> None:
        """
        An AUTH exchange ended with a verdict.

        @param mechanism: the SASL mechanism (C{"PLAIN"}, C{"LOGIN"});
            others count as L{OTHER}.
        @param result: C{"success"} (235), C{"failure"} (535: bad
            credentials, refused authorization identity, network not allowed
            for the user), C{"locked"} (454, refused by a lockout without
            checking the password) or C{"unavailable"} (454, no checker could
            answer).
        """
        mechanism = mechanism.upper()
        if mechanism not in MECHANISMS:
            mechanism = OTHER
        if result not in AUTH_RESULTS:
            result = OTHER
        self._auth.labels(mechanism, result).inc()

    def lockoutStarted(self, kind: str) -> None:
        """
        A lockout key was locked (the C{lockout start} log line).

        @param kind: one of L{LOCKOUT_KINDS}.
        """
        if kind not in LOCKOUT_KINDS:
            kind = OTHER
        self._lockouts.labels(kind).inc()

    # -- messages -------------------------------------------------------------

    def messageAccepted(self, size: int) -> None:
        """
        A message was spooled and answered 250.

        @param size: its size in octets, as spooled (C{Envelope.size}).
        """
        self._accepted.inc()
        self._bytes.inc(max(0, size))

    def messageRejected(self, reason: str) -> None:
        """
        A message, or its transaction at MAIL or RCPT, was refused.

        @param reason: one of L{REJECTION_REASONS}; L{rejectionReason} gives
            it from the reply.
        """
        if reason not in REJECTION_REASONS:
            reason = OTHER
        self._rejected.labels(reason).inc()

    # -- delivery -------------------------------------------------------------

    def deliveryAttempt(self, result: str, upstream: str, count: int = 1) -> None:
        """
        Recipients of one delivery attempt had an outcome.

        @param result: C{"delivered"}, C{"deferred"} (temporary failure,
            retried), C{"bounced"} (permanent failure), C{"expired"} (still
            failing after C{max_lifetime}, bounced) or C{"failed"} (the
            attempt itself went wrong, with no outcome per recipient).
        @param upstream: the report's host; see L{upstreamLabel}.
        @param count: how many recipients had this outcome.
        """
        if result not in DELIVERY_RESULTS:
            result = OTHER
        label = upstreamLabel(upstream)
        if label not in self._upstreams:
            if len(self._upstreams) >= self._maxUpstreams:
                label = OTHER
            else:
                self._upstreams.add(label)
        self._deliveries.labels(result, label).inc(count)

    def deliveryLatency(self, seconds: float) -> None:
        """
        A recipient was delivered C{seconds} after its message was accepted
        (C{now - Envelope.receivedAt}).
        """
        self._latency.observe(max(0.0, seconds))

    # -- queue ----------------------------------------------------------------

    def setQueueSource(self, source: QueueSource | None) -> None:
        """
        Where the queue gauges come from, asked at each scrape.

        @param source: returns C{(depth, oldestAgeSeconds)}; it runs on the
            reactor thread, so it must be quick and must not touch the disk
            (L{queueSnapshot} over queue ids held in memory).  C{None}
            removes it.
        """
        self._queue.source = source


class _WithoutCreated:
    """
    A registry's series without the C{_created} samples of its counters and
    histograms: the text format would expose each as one more gauge series,
    doubling what Prometheus stores for nothing our dashboard uses.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            created = metric.name + "_created"
            if any(sample.name == created for sample in metric.samples):
                metric = copy.copy(metric)
                metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


class MetricsPage(Resource):
    """
    C{GET /metrics}: a registry in the Prometheus text format, or
    OpenMetrics when the scraper asks for it; without C{_created} series.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry
        self._exposed = _WithoutCreated(registry)

    def render_GET(self, request: Request) -> bytes:
        """
        Render every series; a failing collector gives a 500 (and is
        logged by twisted.web).
        """
        accept = request.getHeader(b"accept")
        encoder, contentType = choose_encoder(
            accept.decode("latin-1") if accept else ""
        )
        body = encoder(self._exposed)
        request.setHeader(b"content-type", contentType.encode("ascii"))
        return body


class _MetricsSite(Site):
    """
    A L{Site} that writes no access log line for each scrape.
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass


def makeMetricsService(
    endpointDescription: str, metrics: RelayMetrics, reactor: Any
) -> IService:
    """
    The HTTP service serving C{metrics} at C{/metrics} (404 elsewhere) on
    C{endpointDescription}, e.g. C{"tcp:9187:interface=127.0.0.1"}.  There
    is no authentication: bind it to a private address.

    A listen failure (port in use) fails startup, as for the SMTP listeners.
    """
    root = NoResource()
    root.putChild(b"metrics", MetricsPage(metrics.registry))
    site = _MetricsSite(root, reactor=reactor)
    service: IService = strports.service(endpointDescription, site, reactor)
    return service
