"""
Tests for L{smtpauth_relay.logformat}: JSON log lines, and twistd's text
lines with the time formatted once a second.
"""

from __future__ import annotations

import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.service import Application, IServiceCollection
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smtpauth_relay.logformat import (
    JSONLinesObserver,
    LogObserverRoot,
    cachedFormatTime,
    classicLogText,
    eventAsDict,
    observerFor,
    textObserver,
    twistdLogsToStdout,
    workerObserver,
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


class WorkerObserverTests(SynchronousTestCase):
    """
    Tests for L{workerObserver}.
    """

    def test_tagged(self) -> None:
        """
        A worker's lines say which worker wrote them: in the text line's
        bracket, and as a C{worker} field in JSON.
        """
        text, jsonOut = io.StringIO(), io.StringIO()
        observer = workerObserver(textObserver(text), 2)
        verifyObject(ILogObserver, observer)
        Logger(namespace="smtpauth_relay.server", observer=observer).info(
            "accepted {n}", n=1
        )
        self.assertIn(
            "[smtpauth_relay.server#info worker=2] accepted 1", text.getvalue()
        )
        Logger(
            namespace="x", observer=workerObserver(JSONLinesObserver(jsonOut), 3)
        ).warn("hi")
        record = json.loads(jsonOut.getvalue())
        self.assertEqual((record["worker"], record["level"]), (3, "warn"))

    def test_noLevel(self) -> None:
        """
        An event without a level (a legacy C{twisted.python.log.msg}) has
        the bracket the main process's lines would give it, the worker
        added.
        """
        event = {"log_namespace": "x", "log_format": "hi", "log_time": 0.0}
        main = io.StringIO()
        textObserver(main)(event)
        self.assertIn("[x#-] hi", main.getvalue())
        text = io.StringIO()
        workerObserver(textObserver(text), 4)(event)
        self.assertIn("[x#- worker=4] hi", text.getvalue())


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


class TextObserverTests(SynchronousTestCase):
    """
    Tests for L{textObserver}: twistd's lines, the time formatted once per
    second.
    """

    @settings(max_examples=300)
    @given(
        st.lists(
            st.one_of(
                st.floats(min_value=0, max_value=4_000_000_000),
                st.integers(min_value=0, max_value=4_000_000_000).map(
                    lambda n: n + 0.9999996
                ),
                st.none(),
            ),
            min_size=1,
            max_size=20,
        )
    )
    def test_sameTimes(self, times: list[float | None]) -> None:
        """
        Whatever the order of the times, each is formatted exactly as
        L{twisted.logger.formatTime} formats it, including just before a
        second ends (where rounding to microseconds gives the next one).
        """
        timeOf = cachedFormatTime()
        for when in times:
            self.assertEqual(timeOf(when), formatTime(when), when)

    def test_sameLines(self) -> None:
        """
        The lines are those of twistd's own text observer.
        """
        ours, theirs = io.StringIO(), io.StringIO()
        events: list[dict[str, object]] = [
            {
                "log_format": "accepted {queueId}",
                "queueId": "Q1",
                "log_time": 1_800_000_000.25,
                "log_system": "RelayESMTP,7,192.0.2.1",
                "log_level": LogLevel.info,
            },
            {
                "log_format": "two\nlines",
                "log_time": 1_800_000_000.75,
                "log_namespace": "smtpauth_relay.retry",
            },
            {"log_format": "no time"},
            {
                "log_format": "failed",
                "log_time": 1_800_000_003.0,
                "log_failure": Failure(ValueError("boom")),
            },
        ]
        observer = textObserver(ours)
        for event in events:
            observer(dict(event))
        reference = textFileLogObserver(theirs)
        for event in events:
            reference(dict(event))
        self.assertEqual(ours.getvalue(), theirs.getvalue())
        self.assertIn("accepted Q1", ours.getvalue())


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def count(self) -> int:
        self.calls += 1
        return self.calls

    def __format__(self, spec: str) -> str:
        return f"counter:{spec}"

    def __repr__(self) -> str:
        return f"<Counter {self.calls}>"


_FORMATS = [
    "accepted {queueId} from {peer}",
    "{peer!r} said {text!s}",
    "{number:>8.2f}|{number:x}",
    "{number.real} {text[0]}",
    "{counter.count()} calls",
    "{counter:spec}",
    "{missing}",
    "{}",
    "{{braces}} {text}",
    "",
    "line one\nline two {text}",
    "{text.nope}",
    "{peer.__class__.__name__}",
]


class ClassicLogTextTests(SynchronousTestCase):
    """
    Tests for L{classicLogText}: Twisted's classic lines, faster.
    """

    @settings(max_examples=400)
    @given(
        format=st.one_of(
            st.sampled_from(_FORMATS),
            st.sampled_from(_FORMATS).map(str.encode),
            st.none(),
            st.just(42),
            st.text(max_size=30),
        ),
        text=st.text(min_size=1, max_size=20),
        number=st.one_of(st.integers(), st.floats(allow_nan=False)),
        system=st.one_of(st.none(), st.text(max_size=10), st.just(7)),
        level=st.one_of(st.none(), st.sampled_from(list(LogLevel.iterconstants()))),
        namespace=st.one_of(st.none(), st.sampled_from(["smtpauth_relay.server"])),
        when=st.one_of(st.none(), st.floats(min_value=0, max_value=4e9)),
        failure=st.booleans(),
    )
    def test_sameAsTwisted(
        self,
        format: object,
        text: str,
        number: float,
        system: object,
        level: object,
        namespace: str | None,
        when: float | None,
        failure: bool,
    ) -> None:
        """
        Whatever the event, the line is Twisted's (or, like Twisted's,
        none).
        """
        event: dict[str, object] = {
            "queueId": "Q1",
            "peer": Peer(),
            "text": text,
            "number": number,
        }
        for key, value in [
            ("log_format", format),
            ("log_system", system),
            ("log_level", level),
            ("log_namespace", namespace),
            ("log_time", when),
        ]:
            if value is not None:
                event[key] = value
        if failure:
            event["log_failure"] = Failure(ValueError("boom"))
        ours = classicLogText(formatTime)
        ourEvent = dict(event, counter=Counter())
        theirEvent = dict(event, counter=Counter())
        self.assertEqual(
            ours(ourEvent), formatEventAsClassicLogText(theirEvent, formatTime)
        )
        self.assertEqual(ourEvent["counter"].calls, theirEvent["counter"].calls)


class FakeTwistdOptions(dict[str, object]):
    pass


class TwistdLogsToStdoutTests(SynchronousTestCase):
    def options(self, **kw: object) -> FakeTwistdOptions:
        values: dict[str, object] = dict(
            nodaemon=True, syslog=False, logger=None, logfile=None
        )
        values.update(kw)
        return FakeTwistdOptions(values)

    def test_choices(self) -> None:
        """
        Only twistd writing to standard output (C{-n}, with no log file,
        syslog or logger of its own) gets the relay's text observer.
        """
        self.assertTrue(twistdLogsToStdout(self.options()))
        self.assertTrue(twistdLogsToStdout(self.options(logfile="-")))
        self.assertFalse(twistdLogsToStdout(self.options(logfile="relay.log")))
        self.assertFalse(twistdLogsToStdout(self.options(syslog=True)))
        self.assertFalse(twistdLogsToStdout(self.options(logger=object())))
        self.assertFalse(twistdLogsToStdout(self.options(nodaemon=False)))
        self.assertFalse(twistdLogsToStdout(None))
        out = io.StringIO()
        self.assertIsNotNone(observerFor("text", out, self.options()))
        self.assertIsNone(observerFor("text", out, self.options(syslog=True)))
        self.assertIsInstance(
            observerFor("json", out, self.options(syslog=True)), JSONLinesObserver
        )
