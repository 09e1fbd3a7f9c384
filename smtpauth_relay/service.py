"""
Service wiring: from a validated L{Config} and a reactor to the running
relay, one L{MultiService} holding every listener and the queue runner.

Every listener is a Twisted server endpoint string, so C{systemd:} (socket
activation), C{unix:} and C{tcp6:} need no code of ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.cred import strcred
from twisted.cred.checkers import (
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from smtpauth_relay.auth import makePortal
from smtpauth_relay.config import Config
from smtpauth_relay.delivery.maildir import MaildirDelivery, ensureMaildir
from smtpauth_relay.policy import RelayPolicy
from smtpauth_relay.retry import QueueRunner
from smtpauth_relay.server import (
    ConnectionLimiter,
    RelayServerFactory,
    SessionSettings,
)
from smtpauth_relay.spool import Spool
from smtpauth_relay.threads import ownThreadPool, threadPoolRunner
from smtpauth_relay.tls import serverContextFactory

log = Logger()


def adaptChecker(checker: ICredentialsChecker) -> ICredentialsChecker:
    """
    Twisted's own C{memory:} checker keeps its users as text, while SMTP
    credentials (ours and twisted.mail's) are bytes, so it would refuse
    everyone; convert its users to bytes.  Other checkers pass unchanged.
    """
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        checker.users = {
            (k.encode() if isinstance(k, str) else k): (
                v.encode() if isinstance(v, str) else v
            )
            for k, v in checker.users.items()
        }
    return checker


def sessionSettings(config: Config, tlsMode: str) -> SessionSettings:
    """
    The per-session settings of a listener with TLS mode C{tlsMode}.
    """
    server = config.server
    return SessionSettings(
        hostname=server.hostname,
        maxMessageSize=server.max_message_size,
        maxRecipients=server.max_recipients,
        idleTimeout=server.idle_timeout,
        maxLineLength=server.max_line_length,
        mechanisms=config.auth.mechanisms,
        requireTLS=config.auth.require_tls,
        tlsMode=tlsMode,
    )


def makeRelayService(
    config: Config,
    reactor: Any,
    extraCheckers: Sequence[ICredentialsChecker] = (),
) -> MultiService:
    """
    Build the relay.  Blocking (it prepares the spool and reads the TLS
    files), so call it before the reactor runs, as C{twistd} does.

    @param extraCheckers: checkers from C{--auth}, asked after the
        configuration's own, in order.
    """
    top = MultiService()
    # The spool and the Maildir have their own threads: password hashing
    # (on the reactor's pool) must never delay the fsync before a 250.
    runInThread = threadPoolRunner(reactor, ownThreadPool(reactor, "spool", 4))

    spool = Spool(config.queue.directory, runInThread, reactor)
    spool.prepare()

    checkers = [strcred.makeChecker(c) for c in config.auth.checkers]
    checkers = [adaptChecker(c) for c in checkers + list(extraCheckers)]
    portal = makePortal(checkers, reactor)
    if not checkers:
        log.warn("no credential checkers configured: AUTH is not offered")

    policy = RelayPolicy(
        trustedNetworks=config.relay.trusted_networks,
        trustedRelays=config.relay.trusted_relays,
    )
    limiter = ConnectionLimiter(
        config.server.max_connections, config.server.max_connections_per_ip
    )
    contextFactory = None
    if config.tls.certificate and config.tls.private_key:
        contextFactory = serverContextFactory(
            config.tls.certificate, config.tls.private_key, config.tls.minimum_version
        )

    resolver = None
    if config.server.reverse_dns:
        from twisted.names import client

        resolver = client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)

    for listener in config.listeners:
        factory: Any = RelayServerFactory(
            sessionSettings(config, listener.tls),
            portal,
            spool,
            policy,
            limiter,
            reactor,
            contextFactory,
            resolver,
        )
        if listener.tls == "implicit":
            assert contextFactory is not None, "config requires [tls] for TLS"
            factory = TLSMemoryBIOFactory(contextFactory, False, factory)
        # strports.service makes a listen failure (port in use) fail startup
        # instead of being logged while the daemon runs deaf.
        strports.service(listener.endpoint, factory, reactor).setServiceParent(top)
        log.info(
            "listening on {endpoint} (tls={tls})",
            endpoint=listener.endpoint,
            tls=listener.tls,
        )

    ensureMaildir(config.delivery.directory)
    agent = MaildirDelivery(config.delivery.directory, runInThread, reactor)
    QueueRunner(spool, agent, reactor, runInThread=runInThread).setServiceParent(top)
    SessionDrain(limiter, reactor).setServiceParent(top)
    return top


class SessionDrain(Service):
    """
    At shutdown, closes the open SMTP sessions with 421 4.3.2, letting a
    message under way finish first (see L{ConnectionLimiter.drain}).
    """

    grace = 10.0

    def __init__(self, limiter: ConnectionLimiter, clock: Any) -> None:
        self.limiter = limiter
        self.clock = clock

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.limiter.drain(self.clock, self.grace)
