"""
Tests for L{smtpauth_relay.logformat}: JSON log lines.
"""

from __future__ import annotations

import io
import json

from twisted.application.service import Application, IServiceCollection
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smtpauth_relay.logformat import (
    JSONLinesObserver,
    LogObserverRoot,
    eventAsDict,
    observerFor,
)


class Peer:
    def __repr__(self) -> str:
        return "<Peer 192.0.2.1>"


class EventAsDictTests(SynchronousTestCase):
    """
    Tests for L{eventAsDict}.
    """

    def event(self, **fields: object) -> dict[str, object]:
        event: dict[str, object] = {
            "log_format": "AUTH {mechanism} ok for {user} from {peer}",
            "log_level": LogLevel.info,
            "log_namespace": "smtpauth_relay.server",
            "log_time": 1795824000.25,
            "log_logger": Logger(),
            "log_source": object(),
        }
        event.update(fields)
        return event

    def test_fields(self) -> None:
        """
        The record has the time in ISO 8601 UTC, the level's name, the
        namespace, the formatted message and the plain named fields; the
        C{log_*} internals are left out.
        """
        record = eventAsDict(
            self.event(mechanism="PLAIN", user="alice", peer="192.0.2.1", size=3)
        )
        self.assertEqual(
            record,
            {
                "time": "2026-11-28T00:00:00.250+00:00",
                "level": "info",
                "namespace": "smtpauth_relay.server",
                "message": "AUTH PLAIN ok for alice from 192.0.2.1",
                "mechanism": "PLAIN",
                "user": "alice",
                "peer": "192.0.2.1",
                "size": 3,
            },
        )

    def test_secretsLeftOut(self) -> None:
        """
        Fields whose names suggest a secret are never written, even if a
        caller passed one (the message, built from the format, names only
        what the format names).
        """
        record = eventAsDict(
            self.event(
                mechanism="PLAIN",
                user="alice",
                peer="p",
                password="hunter2",
                client_secret="s",
                accessToken="t",
                credentials="c",
                private_key="k",
            )
        )
        self.assertNotIn("hunter2", json.dumps(record))
        for name in ("password", "client_secret", "accessToken", "credentials"):
            self.assertNotIn(name, record)
        self.assertNotIn("private_key", record)

    def test_nonPlainValues(self) -> None:
        """
        Objects are left out of the fields (their text is in the message if
        the format uses them); lists of plain values are kept.
        """
        record = eventAsDict(
            self.event(
                log_format="peer {peer}",
                peer=Peer(),
                recipients=["a@example.org", "b@example.org"],
            )
        )
        self.assertEqual(record["message"], "peer <Peer 192.0.2.1>")
        self.assertNotIn("peer", record)
        self.assertEqual(record["recipients"], ["a@example.org", "b@example.org"])

    def test_failure(self) -> None:
        """
        A logged failure adds C{error} (type and message) and C{traceback}.
        """
        failure = Failure(ZeroDivisionError("division by zero"))
        record = eventAsDict(
            self.event(
                log_format="it broke", log_level=LogLevel.critical, log_failure=failure
            )
        )
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["error"], "ZeroDivisionError: division by zero")
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_noTimeNoLevel(self) -> None:
        """
        An event without time or level (not from a Logger) still gives a
        record.
        """
        record = eventAsDict({"log_format": "hello"})
        self.assertEqual(record["time"], None)
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["message"], "hello")


class JSONLinesObserverTests(SynchronousTestCase):
    """
    Tests for L{JSONLinesObserver}.
    """

    def test_oneLinePerEvent(self) -> None:
        """
        Each event is one line of JSON, written at once; newlines in values
        are escaped, non-ASCII is kept readable.
        """
        out = io.StringIO()
        observer = JSONLinesObserver(out)
        verifyObject(ILogObserver, observer)
        log = Logger(namespace="test", observer=observer)
        log.info("hello {user}", user="zoë")
        log.warn("two\nlines {n}", n=2)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(first["message"], "hello zoë")
        self.assertIn("zoë", lines[0])
        self.assertEqual(second["level"], "warn")
        self.assertEqual(second["message"], "two\nlines 2")


class ObserverForTests(SynchronousTestCase):
    """
    Tests for L{observerFor} and L{LogObserverRoot}.
    """

    def test_text(self) -> None:
        """
        C{"text"} keeps twistd's own observer: no component is set.
        """
        self.assertIsNone(observerFor("text"))
        application = Application("test")
        LogObserverRoot(observerFor("text")).setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver, None))

    def test_json(self) -> None:
        """
        C{"json"} gives a L{JSONLinesObserver}, which the root service sets
        as the application's log observer (what twistd then installs) while
        still joining the application's services.
        """
        out = io.StringIO()
        observer = observerFor("json", out)
        self.assertIsInstance(observer, JSONLinesObserver)
        application = Application("test")
        root = LogObserverRoot(observer)
        root.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)
        self.assertEqual(list(IServiceCollection(application)), [root])
