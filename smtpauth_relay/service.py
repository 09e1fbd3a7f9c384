"""
Service wiring: from a validated L{Config} and a reactor to the running
relay, one L{MultiService} holding every listener and the queue runner.

Every listener is a Twisted server endpoint string, so C{systemd:} (socket
activation), C{unix:} and C{tcp6:} need no code of ours.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.cred import strcred
from twisted.cred.checkers import (
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from smtpauth_relay.auth import ChainChecker, makePortal
from smtpauth_relay.config import (
    Config,
    ListenerConfig,
    loadConfig,
    readPasswordFile,
)
from smtpauth_relay.control import makeControlService
from smtpauth_relay.delivery.maildir import MaildirDelivery, ensureMaildir
from smtpauth_relay.delivery.mx import MXDelivery, makeResolver
from smtpauth_relay.delivery.smarthost import SmarthostDelivery
from smtpauth_relay.errors import ConfigError, ListenerUnavailable
from smtpauth_relay.flow import BACKLOG_PER_DELIVERY, InFlow
from smtpauth_relay.heap import StartupHeapFreezer
from smtpauth_relay.interfaces import (
    IAdmission,
    IDeliveryAgent,
    IFlowControl,
    ILoginGuard,
    ISessionLimits,
    ISessionMetrics,
)
from smtpauth_relay.ipc import MainChannel
from smtpauth_relay.limits import RateLimits
from smtpauth_relay.lockout import Lockout, lockoutTimer
from smtpauth_relay.metrics import RelayMetrics, makeMetricsService, queueSnapshot
from smtpauth_relay.passwords import SALT_KEY_FILE, saltKey, useSaltKey
from smtpauth_relay.policy import RelayPolicy
from smtpauth_relay.proxyprotocol import ProxyProtocolFactory
from smtpauth_relay.retry import QueueRunner
from smtpauth_relay.senders import SenderLoginMap
from smtpauth_relay.server import (
    TLS_ORDER,
    ConnectionLimiter,
    RelayServerFactory,
    SessionSettings,
)
from smtpauth_relay.spool import Spool
from smtpauth_relay.systemd import Notifier, NotifyService
from smtpauth_relay.threads import RunInThread, ownThreadRunner, threadPoolRunner
from smtpauth_relay.tls import ReloadableContext, serverContextFactory
from smtpauth_relay.usernetworks import UserNetworks
from smtpauth_relay.workers import WorkerSupervisor, shareable, workerCount

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


def systemdSocketMissing(endpoint: str, environ: Any = os.environ) -> str:
    """
    Why a C{systemd:} listener found no socket: which ones systemd passed.
    """
    names = environ.get("LISTEN_FDNAMES", "")
    passed = ", ".join(repr(n) for n in names.split(":")) if names else "none"
    return (
        f"[[listener]] endpoint {endpoint!r}: systemd passed no such socket"
        f" (sockets passed: {passed}); check"
        " FileDescriptorName= in the .socket unit, and start the service"
        " through its socket"
    )


def sessionSettings(config: Config, listener: ListenerConfig) -> SessionSettings:
    """
    The per-session settings of C{listener}.
    """
    server = config.server
    floor = config.tls.minimum_version
    listenerFloor = listener.minimum_tls_version or floor
    legacyTLS = TLS_ORDER.get(listenerFloor, 2) < TLS_ORDER.get(floor, 2)
    return SessionSettings(
        hostname=server.hostname,
        maxMessageSize=server.max_message_size,
        maxRecipients=server.max_recipients,
        idleTimeout=server.idle_timeout,
        dataTimeout=server.data_timeout,
        maxSessionTime=server.max_session_time,
        maxLineLength=server.max_line_length,
        mechanisms=config.auth.mechanisms,
        requireTLS=config.auth.require_tls,
        tlsMode=listener.tls,
        sessionMaxAuthFailures=config.auth.lockout.session_max_failures,
        tlsFloor=floor,
        legacyTLSFrom=config.relay.trusted_networks if legacyTLS else (),
        plaintextAuthFrom=listener.allow_plaintext_auth_from,
        bareLFFrom=listener.allow_bare_lf_from,
    )


def warnLegacyLane(listener: ListenerConfig) -> None:
    """
    Name, at start, what a listener's legacy lane lets through.
    """
    if listener.allow_plaintext_auth_from:
        log.warn(
            "{endpoint}: AUTH without TLS allowed from {networks}; passwords"
            " from these devices cross the LAN in clear",
            endpoint=listener.endpoint,
            networks=", ".join(str(n) for n in listener.allow_plaintext_auth_from),
        )
    if listener.allow_bare_lf_from:
        log.warn(
            "{endpoint}: bare LF taken as a line end from {networks}",
            endpoint=listener.endpoint,
            networks=", ".join(str(n) for n in listener.allow_bare_lf_from),
        )
    if listener.minimum_tls_version in ("TLSv1", "TLSv1.1"):
        log.warn(
            "{endpoint}: {version} allowed for [relay] trusted_networks",
            endpoint=listener.endpoint,
            version=listener.minimum_tls_version,
        )


def workerSpool(spool: Spool, index: int) -> Callable[[str, Any], None]:
    """
    What the main process does with worker C{index}'s committed messages:
    queue them, and give it back the spool files they used.
    """
    spool.files.outlet(index)

    def committed(queueId: str, envelope: Any) -> None:
        spool.adopt(queueId, envelope, index)

    return committed


def workerCleanUp(
    spool: Spool, runner: QueueRunner, runInThread: RunInThread
) -> Callable[[int], Deferred[None]]:
    """
    What the main process does when worker C{N} has ended: remove the
    files it was writing, and schedule any message it committed but did
    not report (it died in between).
    """

    def cleanUp(index: int) -> Deferred[None]:
        def adopt(queued: list[str]) -> None:
            known = runner.queuedIds()
            unknown = [queueId for queueId in queued if queueId not in known]
            for queueId in unknown:
                runner.schedule(queueId, 0)
            if unknown:
                log.info(
                    "{count} queued messages the queue runner had not been"
                    " told of are scheduled (worker {index} ended)",
                    count=len(unknown),
                    index=index,
                )

        d: Deferred[list[str]] = runInThread(spool.workerEnded, index)
        return d.addCallback(adopt)

    return cleanUp


@dataclass
class SessionParts:
    """
    What every listener's sessions share, in the main process or a worker.
    """

    portal: Portal
    spool: Any
    policy: RelayPolicy
    limiter: ConnectionLimiter
    reactor: Any
    tlsContexts: dict[str | None, ReloadableContext]
    """Listener TLS contexts by minimum_tls_version (None: [tls]'s)."""
    resolver: Any
    lockout: ILoginGuard | None
    senders: SenderLoginMap | None
    limits: ISessionLimits | None
    userNetworks: UserNetworks | None
    metrics: ISessionMetrics
    flow: IFlowControl | None
    admission: IAdmission | None = None


def makeSessionParts(
    config: Config,
    reactor: Any,
    extraCheckers: Sequence[ICredentialsChecker],
    spool: Any,
    limiter: ConnectionLimiter,
    lockout: ILoginGuard | None,
    limits: ISessionLimits | None,
    metrics: ISessionMetrics,
    flow: IFlowControl | None,
    admission: IAdmission | None = None,
) -> SessionParts:
    """
    Build the credential checkers, the TLS contexts and the policies the
    sessions use.  Blocking (it reads the TLS files).
    """
    checkers = [strcred.makeChecker(c) for c in config.auth.checkers]
    checkers = [adaptChecker(c) for c in checkers + list(extraCheckers)]
    portal = makePortal(checkers, reactor)
    if not checkers:
        log.warn("no credential checkers configured: AUTH is not offered")
    # One TLS context for the listeners at [tls] minimum_version (key None),
    # one for each other minimum_tls_version a listener asks for.
    tlsContexts: dict[str | None, ReloadableContext] = {}
    if config.tls.certificate and config.tls.private_key:
        for version in {None} | {x.minimum_tls_version for x in config.listeners}:
            tlsContexts[version] = ReloadableContext(
                serverContextFactory(
                    config.tls.certificate,
                    config.tls.private_key,
                    version or config.tls.minimum_version,
                )
            )
    resolver = None
    if config.server.reverse_dns:
        from twisted.names import client

        resolver = client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    return SessionParts(
        portal=portal,
        spool=spool,
        policy=RelayPolicy(
            trustedNetworks=config.relay.trusted_networks,
            trustedRelays=config.relay.trusted_relays,
        ),
        limiter=limiter,
        reactor=reactor,
        tlsContexts=tlsContexts,
        resolver=resolver,
        lockout=lockout,
        senders=(
            SenderLoginMap(config.relay.sender_login_map, config.relay.sender_plus_tags)
            if config.relay.sender_login_map
            else None
        ),
        limits=limits,
        userNetworks=(
            UserNetworks(config.auth.allowed_networks)
            if config.auth.allowed_networks
            else None
        ),
        metrics=metrics,
        flow=flow,
        admission=admission,
    )


def makeListenerFactory(
    config: Config, listener: ListenerConfig, parts: SessionParts
) -> tuple[RelayServerFactory, Any]:
    """
    The session factory of C{listener}, and the factory to listen with (with
    its implicit TLS and PROXY protocol layers).
    """
    listenerContext = parts.tlsContexts.get(listener.minimum_tls_version)
    sessions = RelayServerFactory(
        sessionSettings(config, listener),
        parts.portal,
        parts.spool,
        parts.policy,
        parts.limiter,
        parts.reactor,
        listenerContext,
        parts.resolver,
        parts.lockout,
        parts.senders,
        config.relay.check_header_from,
        parts.limits,
        parts.userNetworks,
        parts.metrics,
        listener.endpoint,
        parts.flow,
        parts.admission,
    )
    factory: Any = sessions
    if listener.tls == "implicit":
        assert listenerContext is not None, "config requires [tls] for TLS"
        factory = TLSMemoryBIOFactory(listenerContext, False, factory)
    if listener.proxy_protocol:
        # The PROXY header comes first on the wire, before any TLS: the
        # PROXY layer is the outermost.
        factory = ProxyProtocolFactory(factory, listener.trusted_proxies, parts.reactor)
    return sessions, factory


def makeRelayService(
    config: Config,
    reactor: Any,
    extraCheckers: Sequence[ICredentialsChecker] = (),
    workerArguments: Sequence[str] = (),
) -> MultiService:
    """
    Build the relay.  Blocking (it prepares the spool and reads the TLS
    files), so call it before the reactor runs, as C{twistd} does.

    @param extraCheckers: checkers from C{--auth}, asked after the
        configuration's own, in order.
    @param workerArguments: the C{--auth} options that made
        C{extraCheckers}, for the worker processes (C{[server] workers}).
    """
    top = MultiService()
    # The spool and the Maildir have their own threads: password hashing
    # (on the reactor's pool) must never delay the fsync before a 250.
    runInThread = ownThreadRunner(reactor, "spool", 4)

    spool = Spool(config.queue.directory, runInThread, reactor)
    spool.prepare()
    # Before the checkers, and shared with the workers (which read it).
    useSaltKey(saltKey(os.path.join(config.queue.directory, SALT_KEY_FILE)))

    limiter = ConnectionLimiter(
        config.server.max_connections, config.server.max_connections_per_ip
    )
    metrics = RelayMetrics()
    # Sessions wait at MAIL FROM once BACKLOG_PER_DELIVERY times as many new
    # messages wait for their first attempt as can be under way.
    flow = InFlow(
        reactor,
        config.queue.flow_delay,
        limit=BACKLOG_PER_DELIVERY * config.queue.max_concurrent_deliveries,
    )
    lockout = Lockout(config.auth.lockout, reactor, metrics=metrics)
    limits = RateLimits(config.limits, reactor, lockout.store)
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
    )
    lockoutTimer(lockout).setServiceParent(top)

    factories: dict[int, RelayServerFactory] = {}
    listening: list[tuple[int, Any]] = []
    for index, listener in enumerate(config.listeners):
        warnLegacyLane(listener)
        sessions, factory = makeListenerFactory(config, listener, parts)
        factories[index] = sessions
        # strports.service makes a listen failure (port in use) fail startup
        # instead of being logged while the daemon runs deaf.
        try:
            service = strports.service(listener.endpoint, factory, reactor)
        except (IndexError, KeyError):
            raise ListenerUnavailable(systemdSocketMissing(listener.endpoint)) from None
        service.setServiceParent(top)
        if shareable(listener.endpoint):
            listening.append((index, service))
        elif workerCount(config) > 1:
            log.info(
                "{endpoint}: served by the main process only (worker processes"
                " share tcp:, tcp6:, unix: and systemd: listeners)",
                endpoint=listener.endpoint,
            )
        log.info(
            "listening on {endpoint} (tls={tls})",
            endpoint=listener.endpoint,
            tls=listener.tls,
        )

    agent = makeDeliveryAgent(config, reactor, runInThread)
    runner = QueueRunner(
        spool,
        agent,
        reactor,
        retrySchedule=config.queue.retry_schedule,
        maxConcurrent=config.queue.max_concurrent_deliveries,
        runInThread=runInThread,
        maxLifetime=config.queue.max_lifetime,
        delayWarning=config.queue.delay_warning,
        hostname=config.server.hostname,
        metrics=metrics,
        flow=flow,
    )
    runner.setServiceParent(top)
    relay = Relay.fromParts(config, extraCheckers, factories, parts, runner)
    supervisor = None
    count = workerCount(config)
    if count > 1 and listening:
        # After the listeners (whose sockets the workers share) and the
        # queue runner (which delivers what they accept).  Each worker's
        # spool directory is made once, not at each restart.
        committedBy = {index: workerSpool(spool, index) for index in range(1, count)}
        supervisor = WorkerSupervisor(
            reactor,
            count - 1,
            config.path,
            list(workerArguments),
            listening,
            lambda index: MainChannel(
                committedBy[index], limiter, lockout, limits, flow, metrics
            ),
            workerCleanUp(spool, runner, runInThread),
            lambda: (config.text, relay.config.text),
        )
        supervisor.setServiceParent(top)
    metrics.setQueueSource(lambda: queueSnapshot(runner.queuedIds(), reactor.seconds()))
    if config.metrics.endpoint:
        makeMetricsService(config.metrics.endpoint, metrics, reactor).setServiceParent(
            top
        )
    AgentCloser(agent, runner).setServiceParent(top)
    CheckerCloser(parts.portal).setServiceParent(top)
    # After prepare(): the spool lock is what makes removing a stale control
    # socket safe.
    makeControlService(
        config.queue.directory, runner, reactor, lockout=lockout
    ).setServiceParent(top)
    SessionDrain(limiter, reactor).setServiceParent(top)
    # Last: it tells systemd we are ready once everything above has started,
    # and (stopped first) that we are stopping.
    notifier = NotifyService(Notifier(), reactor)
    notifier.setServiceParent(top)
    Reloader(
        relay,
        notifier,
        reactor,
        onReload=supervisor.reload if supervisor is not None else None,
    ).setServiceParent(top)
    StartupHeapFreezer(reactor).setServiceParent(top)
    return top


@dataclass
class Relay:
    """
    The running relay's parts that a reload (SIGHUP) can change in place.
    """

    config: Config
    extraCheckers: list[ICredentialsChecker]
    factories: dict[int, RelayServerFactory]
    """The session factories, by index in C{config.listeners}: a worker
    has one for each listener it shares only."""
    portal: Portal
    tlsContext: ReloadableContext | None
    lockout: ILoginGuard | None
    limits: ISessionLimits | None
    runner: QueueRunner | None
    """The queue runner; C{None} in a worker process."""
    tlsContexts: dict[str | None, ReloadableContext] = field(default_factory=dict)
    """Every listener TLS context, by minimum_tls_version (None: [tls]'s)."""
    flow: IFlowControl | None = None
    runningListeners: tuple[ListenerConfig, ...] = ()
    """The listeners as started (a change needs a restart); by default
    C{config.listeners}."""

    def __post_init__(self) -> None:
        if not self.runningListeners:
            self.runningListeners = self.config.listeners

    @classmethod
    def fromParts(
        cls,
        config: Config,
        extraCheckers: Sequence[ICredentialsChecker],
        factories: dict[int, RelayServerFactory],
        parts: SessionParts,
        runner: QueueRunner | None,
    ) -> Relay:
        """
        The reloadable parts of a relay (or of a worker, without a runner).
        """
        return cls(
            config,
            list(extraCheckers),
            factories,
            parts.portal,
            parts.tlsContexts.get(None),
            parts.lockout,
            parts.limits,
            runner,
            parts.tlsContexts,
            parts.flow,
        )

    def apply(self, new: Config) -> list[str]:
        """
        Make C{new} the running configuration as far as it can be without a
        restart.  Blocking (it reads the TLS files and makes the checkers):
        run it off the reactor thread, then L{install} on it.

        @return: what still needs a restart to take effect.
        """
        old = self.config
        needsRestart = []
        if new.listeners != self.runningListeners:
            needsRestart.append("[[listener]]")
        if new.queue.directory != old.queue.directory:
            needsRestart.append("[queue] directory")
        if new.delivery != old.delivery:
            needsRestart.append("[delivery]")
        if new.server.max_connections != old.server.max_connections or (
            new.server.max_connections_per_ip != old.server.max_connections_per_ip
        ):
            needsRestart.append("[server] max_connections / max_connections_per_ip")
        if new.metrics != old.metrics:
            needsRestart.append("[metrics]")
        if new.server.workers != old.server.workers:
            needsRestart.append("[server] workers")
        if new.server.reverse_dns != old.server.reverse_dns:
            needsRestart.append("[server] reverse_dns")
        if (new.tls.certificate is None) != (old.tls.certificate is None):
            needsRestart.append("[tls] (turned on or off)")
        self._pending = _Prepared(
            options=(
                {
                    version: serverContextFactory(
                        new.tls.certificate,
                        new.tls.private_key,
                        version or new.tls.minimum_version,
                    )
                    for version in self.tlsContexts
                }
                if new.tls.certificate and new.tls.private_key and self.tlsContexts
                else None
            ),
            checkers=[
                adaptChecker(c)
                for c in [strcred.makeChecker(c) for c in new.auth.checkers]
                + self.extraCheckers
            ],
            senders=(
                SenderLoginMap(new.relay.sender_login_map, new.relay.sender_plus_tags)
                if new.relay.sender_login_map
                else None
            ),
            userNetworks=(
                UserNetworks(new.auth.allowed_networks)
                if new.auth.allowed_networks
                else None
            ),
        )
        return needsRestart

    def install(self, new: Config) -> None:
        """
        Switch to what L{apply} prepared (on the reactor thread).
        """
        prepared = self._pending
        if prepared.options is not None:
            for version, options in prepared.options.items():
                self.tlsContexts[version].options = options
        chain = self.portal.checkers.get(IUsernamePassword)
        if isinstance(chain, ChainChecker):
            replaced = [c for c in chain.checkers if c not in prepared.checkers]
            chain.checkers = prepared.checkers
            closeCheckers(replaced)
        policy = RelayPolicy(
            trustedNetworks=new.relay.trusted_networks,
            trustedRelays=new.relay.trusted_relays,
        )
        # A change of listeners needs a restart: until then the running
        # listeners keep their own keys.
        for index, factory in self.factories.items():
            listener = self.runningListeners[index]
            factory.settings = sessionSettings(new, listener)
            factory.policy = policy
            factory.senders = prepared.senders
            factory.checkHeaderFrom = new.relay.check_header_from
            factory.userNetworks = prepared.userNetworks
        if self.lockout is not None:
            self.lockout.settings = new.auth.lockout
        if self.limits is not None:
            self.limits.settings = new.limits
        runner = self.runner
        if runner is not None:
            runner.retrySchedule = new.queue.retry_schedule
            runner.maxLifetime = new.queue.max_lifetime
            runner.delayWarning = new.queue.delay_warning
            runner.hostname = new.server.hostname
        if self.flow is not None:
            self.flow.delay = new.queue.flow_delay
        self.config = new


@dataclass
class _Prepared:
    options: Any
    checkers: list[ICredentialsChecker]
    senders: SenderLoginMap | None
    userNetworks: UserNetworks | None


class HeldHangups:
    """
    The SIGHUP handler from the start of C{makeService} until the
    L{Reloader} runs: the listeners accept connections before then, and
    SIGHUP's default action would end the process (a C{kill -HUP} from a
    log rotation script, say).  A hangup seen here is a reload the
    L{Reloader} makes as soon as the reactor runs.
    """

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, signum: int, frame: object) -> None:
        self.seen = True


def holdHangups() -> HeldHangups:
    """
    Install a L{HeldHangups} as the SIGHUP handler, and return it.
    """
    held = HeldHangups()
    signal.signal(signal.SIGHUP, held)
    return held


class Reloader(Service):
    """
    Reloads the configuration on SIGHUP (C{systemctl reload}): TLS
    certificate and key, checkers, policy, limits and timeouts take effect at
    once; an invalid new configuration is refused and the running one kept.
    """

    def __init__(
        self,
        relay: Relay,
        notifier: NotifyService,
        reactor: Any,
        installSignal: bool = True,
        runInThread: RunInThread | None = None,
        onReload: Callable[[], object] | None = None,
    ) -> None:
        """
        @param runInThread: where the blocking part (reading files, making
            checkers) runs; the reactor's thread pool by default.
        @param onReload: called as each reload starts (the main process
            passes it on to its workers).
        """
        self.onReload = onReload
        self.relay = relay
        self.notifier = notifier
        self.reactor = reactor
        self.installSignal = installSignal
        self.runInThread = runInThread or threadPoolRunner(reactor)
        self._previous: Any = None
        self._reloading: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        if self.installSignal:
            self._previous = signal.signal(signal.SIGHUP, self._signalled)
            if isinstance(self._previous, HeldHangups) and self._previous.seen:
                # Asked for while we were starting: the file may have
                # changed after we read it.
                self._previous.seen = False
                self.reactor.callWhenRunning(self.reload)

    def stopService(self) -> None:
        super().stopService()
        if self.installSignal and self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _signalled(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[Any]:
        """
        Read the configuration file again and switch to it.
        """
        if self._reloading is not None:
            return self._reloading
        self.notifier.reloading()
        if self.onReload is not None:
            self.onReload()
        path = self.relay.config.path
        log.info("reloading {path}", path=path)

        def prepare() -> tuple[Config, list[str]]:
            new = loadConfig(path)
            return new, self.relay.apply(new)

        def switch(result: tuple[Config, list[str]]) -> None:
            new, needsRestart = result
            self.relay.install(new)
            if needsRestart:
                log.warn(
                    "reloaded {path}; changes to {parts} need a restart",
                    path=path,
                    parts=", ".join(needsRestart),
                )
            else:
                log.info("reloaded {path}", path=path)
            self.notifier.reloaded("reloaded")

        def refused(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, ConfigError):
                problems = error.problems
            else:
                problems = [failure.getErrorMessage()]
            log.error(
                "reload of {path} refused, the running configuration is kept: "
                "{problems}",
                path=path,
                problems="; ".join(problems),
            )
            self.notifier.reloaded("reload refused: see the log")

        def failed(failure: Failure) -> None:
            # A bug in switching, not a bad file: say so, never in silence.
            log.failure(
                "reload of {path} failed while switching to it", failure, path=path
            )
            self.notifier.reloaded("reload failed: see the log")

        def done(result: object) -> None:
            self._reloading = None

        d: Deferred[Any] = self.runInThread(prepare)
        d.addCallbacks(switch, refused)
        d.addErrback(failed)
        d.addBoth(done)
        if not d.called:
            # (Over already if runInThread ran it here.)
            self._reloading = d
        return d


def makeDeliveryAgent(
    config: Config, reactor: Any, runInThread: RunInThread
) -> IDeliveryAgent:
    """
    The outbound side for C{[delivery] mode}.
    """
    delivery = config.delivery
    if delivery.mode == "maildir":
        ensureMaildir(delivery.directory)
        return MaildirDelivery(delivery.directory, runInThread, reactor)
    if delivery.mode == "smarthost":
        if not delivery.verify:
            log.warn(
                "[delivery] verify = false: the smarthost {host}'s certificate is "
                "not checked; anyone on the path can read the mail and the password",
                host=delivery.host,
            )
        password = (
            readPasswordFile(delivery.password_file) if delivery.password_file else b""
        )
        from smtpauth_relay.oauth2 import MECHANISMS, TokenClient, makeHTTPClient
        from smtpauth_relay.rewrite import SenderRewriter

        tokens = None
        username = delivery.username
        if delivery.oauth2 is not None:
            tokens = TokenClient(
                delivery.oauth2.settings(),
                reactor,
                makeHTTPClient(reactor),
                runInThread,
            )
            username = delivery.oauth2.username
        rewriter = None
        senderMap = config.relay.sender_login_map
        if delivery.rewrite_sender or senderMap:
            rewriter = SenderRewriter(
                delivery.rewrite_sender,
                delivery.rewrite_from,
                SenderLoginMap(senderMap) if senderMap else None,
            )
        return SmarthostDelivery(
            reactor,
            delivery.host,
            delivery.port,
            delivery.tls,
            heloName=config.server.hostname,
            verify=delivery.verify,
            caFile=delivery.ca_file,
            username=username,
            password=password,
            forwardAuthIdentity=delivery.forward_auth_identity,
            maxConnections=delivery.max_per_destination,
            connectTimeout=delivery.connect_timeout,
            timeout=delivery.timeout,
            tokens=tokens,
            mechanism=MECHANISMS.get(delivery.auth, ""),
            rewriter=rewriter,
        )
    if delivery.mode == "mx":
        return MXDelivery(
            reactor,
            makeResolver(reactor, delivery.nameservers),
            config.server.hostname,
            port=delivery.port,
            maxPerDestination=delivery.max_per_destination,
            connectTimeout=delivery.connect_timeout,
            timeout=delivery.timeout,
        )
    raise ValueError(f"delivery mode {delivery.mode!r} is not available")


class AgentCloser(Service):
    """
    At shutdown, once the queue runner's deliveries are over, closes the
    delivery agent's upstream connections (QUIT rather than a dropped
    connection).
    """

    def __init__(self, agent: IDeliveryAgent, runner: QueueRunner) -> None:
        self.agent = agent
        self.runner = runner

    def stopService(self) -> Deferred[None]:
        super().stopService()

        async def close() -> None:
            await self.runner.stopService()
            closing = getattr(self.agent, "close", None)
            if closing is not None:
                await closing()

        return Deferred.fromCoroutine(close())


def closeCheckers(checkers: list[ICredentialsChecker]) -> Deferred[None]:
    """
    Call C{close()} on each checker that has one (a plugin's connections or
    pool), logging rather than raising what goes wrong.
    """

    async def close() -> None:
        for checker in checkers:
            closing = getattr(checker, "close", None)
            if not callable(closing):
                continue
            try:
                await maybeDeferred(closing)
            except Exception:
                log.failure("closing credential checker {checker!r}", checker=checker)

    return Deferred.fromCoroutine(close())


class CheckerCloser(Service):
    """
    At shutdown, closes the credential checkers (see L{closeCheckers}).
    """

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    def stopService(self) -> Deferred[None]:
        super().stopService()
        chain = self.portal.checkers.get(IUsernamePassword)
        return closeCheckers(list(getattr(chain, "checkers", [])))


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
