"""
Tests for reloading the configuration while the relay runs (SIGHUP).
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.config import loadConfig
from smtpauth_relay.server import RelayServerFactory
from smtpauth_relay.service import (
    HeldHangups,
    Reloader,
    holdHangups,
    makeRelayService,
)
from smtpauth_relay.threads import runNow
from smtpauth_relay.tls import ReloadableContext, generateSelfSigned
from tests.test_plugins import configText, writeConfig


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.text, _ = configText(self, checkers=("memory:alice:secret",))
        self.path = writeConfig(self, self.text)
        self.reactor = MemoryReactorClock()
        self.top = makeRelayService(loadConfig(self.path), self.reactor)
        (self.reloader,) = [s for s in self.top if isinstance(s, Reloader)]
        self.reloader.installSignal = False
        self.reloader.runInThread = runNow
        self.top.startService()
        self.addCleanup(self.top.stopService)

    def factories(self) -> list[RelayServerFactory]:
        return list(self.reloader.relay.factories.values())

    def rewrite(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def test_settingsAndPolicy(self) -> None:
        """
        A reload applies new limits, trusted networks and checkers to the
        running listeners.
        """
        self.rewrite(
            self.text.replace(
                '[server]\nhostname = "relay.example.org"',
                '[server]\nhostname = "relay.example.org"\nmax_recipients = 7',
            ).replace('"memory:alice:secret"', '"memory:bob:builder"')
            + '\n[relay]\ntrusted_networks = ["10.0.0.0/8"]\n'
        )
        self.successResultOf(self.reloader.reload())
        for factory in self.factories():
            self.assertEqual(factory.settings.maxRecipients, 7)
            self.assertTrue(factory.policy.mayRelay("10.1.2.3", None))
        chain = self.reloader.relay.portal.checkers
        (checker,) = {id(c): c for c in chain.values()}.values()
        self.assertEqual(list(checker.checkers[0].users), [b"bob"])  # type: ignore[attr-defined]

    def test_renewedCertificate(self) -> None:
        """
        A renewed certificate (same paths, new files) is used for new
        connections after a reload, without a restart.
        """
        context = self.reloader.relay.tlsContext
        assert isinstance(context, ReloadableContext)
        before = context.options
        config = loadConfig(self.path)
        assert config.tls.certificate and config.tls.private_key
        generateSelfSigned(config.tls.certificate, config.tls.private_key, "localhost")
        self.successResultOf(self.reloader.reload())
        self.assertIsNot(context.options, before)

    def test_invalidRefused(self) -> None:
        """
        An invalid new configuration is refused with a clear log line, and
        the running one is kept.
        """
        self.rewrite(self.text + "\n[server]\nmax_recipients = -1\n")
        with capturedLogs() as events:
            self.successResultOf(self.reloader.reload())
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("reload of", text)
        self.assertIn("the running configuration is kept", text)
        for factory in self.factories():
            self.assertEqual(factory.settings.maxRecipients, 100)

    def test_restartNeeded(self) -> None:
        """
        Changes that cannot be applied live (listeners) are named in a
        warning; the rest is applied.
        """
        self.rewrite(
            self.text.replace("port=2587", "port=2588").replace(
                '[server]\nhostname = "relay.example.org"',
                '[server]\nhostname = "relay.example.org"\nmax_recipients = 9',
            )
        )
        with capturedLogs() as events:
            self.successResultOf(self.reloader.reload())
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("[[listener]]", text)
        self.assertIn("need a restart", text)
        self.assertEqual(self.factories()[0].settings.maxRecipients, 9)

    def test_workerListenersOnly(self) -> None:
        """
        A worker's relay has factories for some listeners only (those it
        shares): a reload gives each the settings of its own listener, by
        index, not of the listener at its place in the list.
        """
        relay = self.reloader.relay
        implicit = relay.factories[1]
        worker = Reloader(
            replace(relay, factories={1: implicit}),
            self.reloader.notifier,
            self.reactor,
            runInThread=runNow,
        )
        self.rewrite(
            self.text.replace(
                '[server]\nhostname = "relay.example.org"',
                '[server]\nhostname = "relay.example.org"\nmax_recipients = 8',
            )
        )
        with capturedLogs() as events:
            self.successResultOf(worker.reload())
        self.assertEqual(implicit.settings.maxRecipients, 8)
        self.assertEqual(implicit.settings.tlsMode, "implicit")
        self.assertEqual(
            [e for e in events if e.get("log_level") is LogLevel.critical], []
        )

    def test_switchFailureLogged(self) -> None:
        """
        Should switching to a read configuration fail (a bug), the failure
        is logged and systemd told the reload is over; the next reload
        runs.
        """
        told: list[str] = []
        notifier = self.reloader.notifier
        self.patch(notifier, "reloaded", told.append)

        def broken(new: object) -> None:
            raise RuntimeError("switch broke")

        self.patch(self.reloader.relay, "install", broken)
        with capturedLogs() as events:
            self.successResultOf(self.reloader.reload())
        self.flushLoggedErrors(RuntimeError)
        (event,) = [e for e in events if "log_failure" in e]
        self.assertIn("failed while switching", formatEvent(event))
        self.assertIsInstance(event["log_failure"].value, RuntimeError)
        self.assertEqual(told, ["reload failed: see the log"])
        with capturedLogs():
            self.successResultOf(self.reloader.reload())
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(told[1:], ["reload failed: see the log"])

    def test_listenersChangedTwice(self) -> None:
        """
        Until a restart the listeners run as started: a second reload after
        a change of listeners (one fewer, here) still names them as needing
        a restart, and gives each running listener its own settings.
        """
        start = self.text.index("[[listener]]", self.text.index("[[listener]]") + 1)
        oneListener = self.text[:start] + self.text[self.text.index("[auth]") :]
        for recipients in (9, 11):
            self.rewrite(
                oneListener.replace(
                    '[server]\nhostname = "relay.example.org"',
                    '[server]\nhostname = "relay.example.org"\n'
                    f"max_recipients = {recipients}",
                )
            )
            with capturedLogs() as events:
                self.successResultOf(self.reloader.reload())
            text = "\n".join(formatEvent(e) for e in events)
            self.assertIn("[[listener]]", text)
            self.assertNotIn("failed while switching", text)
            factories = self.reloader.relay.factories.values()
            self.assertEqual(
                [(f.settings.maxRecipients, f.settings.tlsMode) for f in factories],
                [(recipients, "starttls"), (recipients, "implicit")],
            )

    def test_sighupHandler(self) -> None:
        """
        Started for real, the reloader handles SIGHUP (and gives the
        previous handler back when stopped).
        """
        calls: list[object] = []

        class SpyReactor:
            def callFromThread(self, f: object, *args: object) -> None:
                calls.append(f)

        reloader = Reloader(
            self.reloader.relay,
            self.reloader.notifier,
            SpyReactor(),
            runInThread=runNow,
        )
        previous = signal.getsignal(signal.SIGHUP)
        reloader.startService()
        os.kill(os.getpid(), signal.SIGHUP)
        reloader.stopService()
        self.assertEqual(calls, [reloader.reload])
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

    def startAfterHeldHangups(
        self, hangup: bool
    ) -> tuple[Reloader, MemoryReactorClock, list[int], HeldHangups]:
        """
        L{holdHangups}, a SIGHUP if C{hangup}, then a reloader started on a
        reactor not yet running; its reloads are counted.
        """
        original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        held = holdHangups()
        if hangup:
            os.kill(os.getpid(), signal.SIGHUP)
            self.assertTrue(held.seen)
        reactor = MemoryReactorClock()
        reloader = Reloader(
            self.reloader.relay, self.reloader.notifier, reactor, runInThread=runNow
        )
        reloads: list[int] = []
        reloader.reload = lambda: reloads.append(1)  # type: ignore[method-assign]
        reloader.startService()
        self.addCleanup(reloader.stopService)
        return reloader, reactor, reloads, held

    def test_hangupWhileStarting(self) -> None:
        """
        A SIGHUP after L{holdHangups} and before the reloader starts does
        not end the process: the reloader reloads once the reactor runs,
        and only once.
        """
        reloader, reactor, reloads, held = self.startAfterHeldHangups(True)
        self.assertEqual(reloads, [])
        reactor.run()
        self.assertEqual(reloads, [1])
        self.assertFalse(held.seen)
        reloader.stopService()
        hooks = len(reactor.whenRunningHooks)
        reloader.startService()
        self.assertEqual(len(reactor.whenRunningHooks), hooks)

    def test_noHangupWhileStarting(self) -> None:
        """
        Without a SIGHUP while starting, no reload.
        """
        _, reactor, reloads, _ = self.startAfterHeldHangups(False)
        reactor.run()
        self.assertEqual(reloads, [])


class CheckerClosingTests(SynchronousTestCase):
    """
    Checkers holding connections (a plugin with C{close()}) are closed when
    a reload replaces them and when the relay stops.
    """

    def setUp(self) -> None:
        import sqlite3

        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        self.database = os.path.join(directory, "users.db")
        sqlite3.connect(self.database).close()
        self.checker = (
            f"sql:sqlite:///{self.database}?query=SELECT h FROM u WHERE n = :user"
        )
        self.text, _ = configText(self, checkers=(self.checker,))
        self.path = writeConfig(self, self.text)
        self.reactor = MemoryReactorClock()
        self.top = makeRelayService(loadConfig(self.path), self.reactor)
        (self.reloader,) = [s for s in self.top if isinstance(s, Reloader)]
        self.reloader.installSignal = False
        self.reloader.runInThread = runNow
        self.top.startService()

    def chain(self) -> list[object]:
        chain = self.reloader.relay.portal.checkers
        (checker,) = {id(c): c for c in chain.values()}.values()
        return list(checker.checkers)  # type: ignore[attr-defined]

    def test_closedWhenReplaced(self) -> None:
        """
        After a reload, the checker it replaced is closed; its successor is
        not.
        """
        (old,) = self.chain()
        self.successResultOf(self.reloader.reload())
        (new,) = self.chain()
        self.assertIsNot(new, old)
        self.assertTrue(old._closed)  # type: ignore[attr-defined]
        self.assertFalse(new._closed)  # type: ignore[attr-defined]
        self.top.stopService()

    def test_closedAtStop(self) -> None:
        """
        Stopping the relay closes its checkers.
        """
        (checker,) = self.chain()
        self.top.stopService()
        self.assertTrue(checker._closed)  # type: ignore[attr-defined]
