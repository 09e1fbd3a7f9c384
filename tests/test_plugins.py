"""
Tests for the twistd and strcred plugins, L{smtpauth_relay.tap} and
L{smtpauth_relay.service.makeRelayService}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IServiceMaker, MultiService
from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin, getPlugins
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smtpauth_relay import tap
from smtpauth_relay.auth import ChainChecker, LoginContext, Submitter, login
from smtpauth_relay.checkers import HtpasswdChecker
from smtpauth_relay.config import Config, parseConfig
from smtpauth_relay.errors import ConfigError
from smtpauth_relay.htpasswd import setUser
from smtpauth_relay.logformat import JSONLinesObserver, LogObserverRoot
from smtpauth_relay.passwords import hashPassword
from smtpauth_relay.retry import QueueRunner
from smtpauth_relay.server import RelayServerFactory
from smtpauth_relay.testing import runNow
from smtpauth_relay.tls import generateSelfSigned


def writeCertificate(testCase: SynchronousTestCase) -> tuple[str, str]:
    """
    A fresh self-signed certificate and key in a temporary directory.
    """
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    generateSelfSigned(cert, key, "relay.example.org")
    return cert, key


def configText(
    testCase: SynchronousTestCase, checkers: tuple[str, ...] = ("memory:alice:secret",)
) -> tuple[str, str]:
    """
    A valid configuration with a STARTTLS and an implicit TLS listener.

    @return: the text and the directory it refers to.
    """
    cert, key = writeCertificate(testCase)
    base = os.path.abspath(testCase.mktemp())
    os.makedirs(base)
    checkerList = ", ".join(f'"{c}"' for c in checkers)
    text = f"""\
[server]
hostname = "relay.example.org"
# One process: a memory reactor starts no worker processes.
workers = 1

[tls]
certificate = "{cert}"
private_key = "{key}"

[[listener]]
endpoint = "tcp:port=2587:interface=127.0.0.1"
tls = "starttls"

[[listener]]
endpoint = "tcp:port=2465:interface=127.0.0.1"
tls = "implicit"

[auth]
checkers = [{checkerList}]

[queue]
directory = "{base}/spool"

[delivery]
mode = "maildir"
directory = "{base}/maildir"
"""
    return text, base


def writeConfig(testCase: SynchronousTestCase, text: str) -> str:
    """
    Write C{text} to a new file and return its path.
    """
    path = os.path.abspath(testCase.mktemp()) + ".toml"
    with open(path, "w") as f:
        f.write(text)
    return path


class PluginDiscoveryTests(SynchronousTestCase):
    """
    The twistd and strcred plugins are found by Twisted's plugin system.
    """

    def test_serviceMaker(self) -> None:
        """
        C{getPlugins(IServiceMaker)} finds exactly one C{smtpauth-relay},
        which provides L{IServiceMaker} and L{IPlugin} and points at
        L{smtpauth_relay.tap}.
        """
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "smtpauth-relay"]
        self.assertEqual(len(makers), 1)
        maker = makers[0]
        self.assertTrue(verifyObject(IServiceMaker, maker))
        self.assertTrue(verifyObject(IPlugin, maker))
        self.assertIs(maker.options, tap.Options)
        self.assertIs(maker.makeService, tap.makeService)
        self.assertTrue(maker.description)

    def test_htpasswdCheckerFactory(self) -> None:
        """
        C{strcred.findCheckerFactory("htpasswd")} finds ours, a complete
        L{strcred.ICheckerFactory} for username/password credentials.
        """
        factory = strcred.findCheckerFactory("htpasswd")
        self.assertEqual(
            type(factory).__module__, "twisted.plugins.smtpauth_relay_htpasswd"
        )
        self.assertTrue(verifyObject(strcred.ICheckerFactory, factory))
        self.assertTrue(verifyObject(IPlugin, factory))
        self.assertEqual(factory.authType, "htpasswd")
        self.assertIn(IUsernamePassword, factory.credentialInterfaces)
        self.assertIn("htpasswd", factory.authHelp)

    def test_htpasswdMakeChecker(self) -> None:
        """
        C{strcred.makeChecker("htpasswd:PATH")} makes an L{HtpasswdChecker}
        for an existing file.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("")
        checker = strcred.makeChecker("htpasswd:" + path)
        self.assertIsInstance(checker, HtpasswdChecker)
        self.assertTrue(verifyObject(ICredentialsChecker, checker))

    def test_htpasswdBadArgument(self) -> None:
        """
        An empty or missing path is a L{ValueError} naming the problem.
        """
        with self.assertRaises(ValueError) as e:
            strcred.makeChecker("htpasswd:")
        self.assertIn("requires the path", str(e.exception))
        missing = os.path.abspath(self.mktemp())
        with self.assertRaises(ValueError) as e:
            strcred.makeChecker("htpasswd:" + missing)
        self.assertIn(missing, str(e.exception))


class OptionsTests(SynchronousTestCase):
    """
    Tests for L{tap.Options}.
    """

    def test_configRequired(self) -> None:
        """
        Without C{--config} the options are a usage error.
        """
        with self.assertRaises(usage.UsageError) as e:
            tap.Options().parseOptions([])
        self.assertIn("--config", str(e.exception))

    def test_missingFile(self) -> None:
        """
        A configuration file that does not exist is a usage error naming it.
        """
        path = os.path.abspath(self.mktemp())
        with self.assertRaises(usage.UsageError) as e:
            tap.Options().parseOptions(["--config", path])
        self.assertIn(path, str(e.exception))

    def test_invalidConfig(self) -> None:
        """
        A configuration with problems is a usage error whose message holds
        every problem line.
        """
        text = '[server]\nmax_recipients = "many"\n\n[tls]\nminimum_version = "SSLv3"\n'
        path = writeConfig(self, text)
        with self.assertRaises(ConfigError) as expected:
            parseConfig(text, path)
        self.assertGreater(len(expected.exception.problems), 1)
        with self.assertRaises(usage.UsageError) as e:
            tap.Options().parseOptions(["--config", path])
        message = str(e.exception)
        self.assertIn("invalid configuration", message)
        for problem in expected.exception.problems:
            self.assertIn(problem, message)

    def test_validConfig(self) -> None:
        """
        A valid configuration is loaded into C{options["relayConfig"]}.
        """
        text, base = configText(self)
        path = writeConfig(self, text)
        options = tap.Options()
        options.parseOptions(["-c", path])
        config = options["relayConfig"]
        self.assertIsInstance(config, Config)
        self.assertEqual(config, parseConfig(text, path))
        self.assertEqual(config.queue.directory, os.path.join(base, "spool"))

    def test_authRepeated(self) -> None:
        """
        Each C{--auth} adds a checker, in command-line order; none replaces
        another.
        """
        text, _ = configText(self)
        path = writeConfig(self, text)
        options = tap.Options()
        options.parseOptions(
            ["--config", path, "--auth", "memory:u:p", "--auth", "memory:v:q"]
        )
        checkers = options["credCheckers"]
        self.assertEqual(len(checkers), 2)
        self.assertEqual([list(c.users) for c in checkers], [["u"], ["v"]])

    def test_help(self) -> None:
        """
        The usage text mentions C{--config} and C{--auth}.
        """
        for text in (str(tap.Options()), tap.Options().getUsage()):
            self.assertIn("--config", text)
            self.assertIn("--auth", text)


class RefusingReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} whose TCP ports are all in use.
    """

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        raise CannotListenError(interface, port, OSError("Address already in use"))


class MakeRelayServiceTests(SynchronousTestCase):
    """
    Tests for L{smtpauth_relay.service.makeRelayService} on a
    L{MemoryReactorClock}.
    """

    def makeService(
        self,
        checkers: tuple[str, ...] = ("memory:alice:secret",),
        extra: tuple[Any, ...] = (),
        reactor: Any = None,
    ) -> tuple[MultiService, Any, str]:
        from smtpauth_relay.service import makeRelayService

        text, base = configText(self, checkers)
        config = parseConfig(text, writeConfig(self, text))
        self.reactor = MemoryReactorClock() if reactor is None else reactor
        return makeRelayService(config, self.reactor, list(extra)), self.reactor, base

    def factories(self, top: MultiService) -> list[Any]:
        return [s.factory for s in top if hasattr(s, "factory")]

    def chain(self, top: MultiService) -> ChainChecker:
        factory = self.factories(top)[0]
        chain = factory.portal.checkers[IUsernamePassword]
        self.assertIsInstance(chain, ChainChecker)
        return chain

    def test_listeners(self) -> None:
        """
        Started, the service listens once per listener, on the configured
        port and interface; the implicit TLS listener's factory wraps the
        relay factory in TLS, the STARTTLS one does not.
        """
        top, reactor, _ = self.makeService()
        self.assertEqual(reactor.tcpServers, [])
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(
            [(port, interface) for port, _, _, interface in reactor.tcpServers],
            [(2587, "127.0.0.1"), (2465, "127.0.0.1")],
        )
        starttls, implicit = (f for _, f, _, _ in reactor.tcpServers)
        self.assertIsInstance(starttls, RelayServerFactory)
        self.assertEqual(starttls.settings.tlsMode, "starttls")
        self.assertIsNotNone(starttls.contextFactory)
        self.assertIsInstance(implicit, TLSMemoryBIOFactory)
        self.assertIsInstance(implicit.wrappedFactory, RelayServerFactory)
        self.assertEqual(implicit.wrappedFactory.settings.tlsMode, "implicit")
        self.assertIs(starttls.portal, implicit.wrappedFactory.portal)
        self.assertIs(starttls.spool, implicit.wrappedFactory.spool)
        self.assertIs(starttls.clock, reactor)
        self.assertEqual(starttls.settings.hostname, "relay.example.org")

    def test_noThreadPoolAtStart(self) -> None:
        """
        Building and starting need nothing of the reactor beyond listening,
        a clock and start/stop hooks: threads are only used when the spool
        or the Maildir first does blocking work, so a L{MemoryReactorClock}
        (no thread pool at all) will do.
        """
        top, reactor, _ = self.makeService(reactor=MemoryReactorClock())
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(len(reactor.tcpServers), 2)

    def test_queueRunner(self) -> None:
        """
        The queue runner is one of the services.
        """
        top, _, _ = self.makeService()
        self.assertEqual(len([s for s in top if isinstance(s, QueueRunner)]), 1)

    def test_directories(self) -> None:
        """
        Building the service prepares the spool's C{tmp/} and C{queued/} and
        the Maildir's C{tmp/}, C{new/} and C{cur/}.
        """
        _, _, base = self.makeService()
        for sub in ("tmp", "queued"):
            self.assertTrue(os.path.isdir(os.path.join(base, "spool", sub)), sub)
        for sub in ("tmp", "new", "cur"):
            self.assertTrue(os.path.isdir(os.path.join(base, "maildir", sub)), sub)

    def test_checkerOrder(self) -> None:
        """
        The portal's one checker is a chain of the configuration's checkers,
        in order, followed by the C{--auth} ones, in order.
        """
        extraOne = strcred.makeChecker("memory:carol:c")
        extraTwo = strcred.makeChecker("memory:dave:d")
        top, _, _ = self.makeService(
            checkers=("memory:alice:a", "memory:bob:b"), extra=(extraOne, extraTwo)
        )
        checkers: list[Any] = self.chain(top).checkers
        self.assertEqual([list(c.users) for c in checkers[:2]], [[b"alice"], [b"bob"]])
        self.assertIs(checkers[2], extraOne)
        self.assertIs(checkers[3], extraTwo)
        self.assertEqual(len(checkers), 4)

    def test_memoryCheckerLogin(self) -> None:
        """
        A user given as C{memory:alice:secret} (documented in the README as
        a checker for tests) can log in through the relay's portal with the
        byte strings the SASL mechanisms produce.
        """
        top, _, _ = self.makeService(checkers=("memory:alice:secret",))
        portal = self.factories(top)[0].portal
        d = login(
            portal, UsernamePassword(b"alice", b"secret"), LoginContext("PLAIN", True)
        )
        self.assertEqual(self.successResultOf(d), Submitter("alice", "PLAIN", True))

    def test_stockCheckersChained(self) -> None:
        """
        A checker that cannot tell an unknown user from a wrong password
        (Twisted's own C{file:}) decides on any failure: a user known only to
        the next checker is refused, so a second backend can never speak for
        a user the first one may own.  An C{htpasswd:} checker first, which
        does tell, passes unknown users on.
        """
        first = os.path.abspath(self.mktemp())
        with open(first, "w") as f:
            f.write("alice:secret\n")
        second = os.path.abspath(self.mktemp())
        with open(second, "w") as f:
            f.write("bob:builder\n")
        top, _, _ = self.makeService(
            checkers=(f"file:{first}",), extra=(strcred.makeChecker(f"file:{second}"),)
        )
        portal = self.factories(top)[0].portal
        alice = login(
            portal, UsernamePassword(b"alice", b"secret"), LoginContext("PLAIN", True)
        )
        self.assertEqual(self.successResultOf(alice).username, "alice")
        bob = login(
            portal, UsernamePassword(b"bob", b"builder"), LoginContext("PLAIN", True)
        )
        self.failureResultOf(bob, UnauthorizedLogin)

    def test_htpasswdPassesUnknownUsersOn(self) -> None:
        """
        With C{htpasswd:} first and C{--auth file:} after it, a user only the
        second knows logs in, and a wrong password for the first's user is
        refused without asking the second.
        """
        first = os.path.abspath(self.mktemp())
        setUser(first, "alice", hashPassword(b"secret", rounds=4))
        second = os.path.abspath(self.mktemp())
        with open(second, "w") as f:
            f.write("bob:builder\nalice:builder\n")
        checker = HtpasswdChecker(
            first, runInThread=runNow, dummyHash=hashPassword(b"x", rounds=4)
        )
        top, _, _ = self.makeService(
            checkers=(), extra=(checker, strcred.makeChecker(f"file:{second}"))
        )
        portal = self.factories(top)[0].portal
        bob = login(
            portal, UsernamePassword(b"bob", b"builder"), LoginContext("PLAIN", True)
        )
        self.assertEqual(self.successResultOf(bob).username, "bob")
        alice = login(
            portal, UsernamePassword(b"alice", b"builder"), LoginContext("PLAIN", True)
        )
        self.failureResultOf(alice, UnauthorizedLogin)

    def test_noCheckers(self) -> None:
        """
        With no checkers at all the service still builds, with nothing
        registered in the portal.
        """
        top, _, _ = self.makeService(checkers=())
        portal = self.factories(top)[0].portal
        self.assertEqual(portal.listCredentialsInterfaces(), [])

    def test_listenFailureRaises(self) -> None:
        """
        A port that cannot be bound makes starting the service fail, instead
        of the relay running deaf.
        """
        top, _, _ = self.makeService(reactor=RefusingReactor())
        self.assertRaises(CannotListenError, top.startService)


class MakeServiceTests(SynchronousTestCase):
    """
    Tests for L{tap.makeService}.
    """

    def test_jsonLogs(self) -> None:
        """
        With C{[logging] format = "json"}, the service twistd gets carries
        a JSON observer, which it sets on the application.
        """
        text, _ = configText(self)
        options = tap.Options()
        options.parseOptions(
            ["--config", writeConfig(self, text + '\n[logging]\nformat = "json"\n')]
        )
        top = tap.makeService(options)
        self.assertIsInstance(top, LogObserverRoot)
        self.assertIsInstance(top.observer, JSONLinesObserver)

    def test_textLogsToStdout(self) -> None:
        """
        Under C{twistd -n} with no log file of twistd's own (how systemd
        runs the relay), the text log gets the relay's observer (twistd's
        lines, the time formatted once a second); with C{--logfile}, twistd
        keeps its own.
        """
        from twisted.logger import FileLogObserver
        from twisted.scripts.twistd import ServerOptions

        for twistdArgs, ours in (
            (["-n"], True),
            (["-n", "--logfile", self.mktemp()], False),
            (["--logfile", self.mktemp()], False),
        ):
            # A spool of its own each time: the relay locks it.
            text, _ = configText(self)
            path = writeConfig(self, text)
            twistd = ServerOptions()
            twistd.parseOptions([*twistdArgs, "smtpauth-relay", "--config", path])
            top = tap.makeService(twistd.subOptions)
            self.assertEqual(
                isinstance(top.observer, FileLogObserver), ours, twistdArgs
            )

    def test_makeService(self) -> None:
        """
        L{tap.makeService} builds the relay from parsed options, with the
        C{--auth} checkers after the configuration's, without listening yet.
        """
        text, _ = configText(self)
        options = tap.Options()
        options.parseOptions(
            ["--config", writeConfig(self, text), "--auth", "memory:bob:b"]
        )
        top = tap.makeService(options)
        self.assertIsInstance(top, LogObserverRoot)
        self.assertIsNone(top.observer)
        self.assertFalse(top.running)
        [relay] = list(top)
        self.assertIsInstance(relay, MultiService)
        factory = [s.factory for s in relay if hasattr(s, "factory")][0]
        chain = factory.portal.checkers[IUsernamePassword]
        self.assertEqual(len(chain.checkers), 2)
        self.assertIs(chain.checkers[1], options["credCheckers"][0])
