"""
Tests for L{smtpauth_relay.envelope}.
"""

from __future__ import annotations

import json
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.envelope import (
    ENVELOPE_VERSION,
    NULL_AUTH,
    Attempt,
    DeliveryReport,
    Envelope,
)

floats = st.floats(allow_nan=False, allow_infinity=False)

attempts = st.builds(Attempt, time=floats, host=st.text(), reply=st.text())

envelopes = st.builds(
    Envelope,
    queueId=st.text(),
    sender=st.text(),
    recipients=st.lists(st.text()).map(tuple),
    auth=st.text(),
    authUser=st.one_of(st.none(), st.text()),
    clientAddress=st.text(),
    helo=st.text(),
    receivedAt=floats,
    size=st.integers(min_value=0, max_value=2**63),
    body=st.sampled_from(["7BIT", "8BITMIME"]),
    attempts=st.lists(attempts, max_size=4).map(tuple),
)

SAMPLE = Envelope(
    queueId="Q0001",
    sender="alice@example.org",
    recipients=("bob@example.net", "carol@example.com"),
    auth="alice",
    authUser="alice",
    clientAddress="192.0.2.10",
    helo="client.example",
    receivedAt=1_800_000_000.5,
    size=1234,
    body="8BITMIME",
)


class EnvelopeJSONTests(SynchronousTestCase):
    """
    Tests for L{Envelope.toJSON} and L{Envelope.fromJSON}.
    """

    def test_defaults(self) -> None:
        """
        An envelope made with only the required fields records C{<>} as its
        C{AUTH=}, no AUTH user, 7BIT and no attempts.
        """
        envelope = Envelope(queueId="Q", sender="", recipients=("b@example.net",))
        self.assertEqual(envelope.auth, NULL_AUTH)
        self.assertEqual(NULL_AUTH, "<>")
        self.assertIsNone(envelope.authUser)
        self.assertEqual(envelope.body, "7BIT")
        self.assertEqual(envelope.attempts, ())

    def test_format(self) -> None:
        """
        The JSON is a readable object with sorted keys, a version and a
        trailing newline, and attempts as objects.
        """
        envelope = SAMPLE.withAttempt(
            Attempt(1_800_000_100.0, "mx.example.net", "451 try later"),
            ("carol@example.com",),
        )
        raw = envelope.toJSON()
        self.assertTrue(raw.endswith(b"}\n"))
        data = json.loads(raw)
        self.assertEqual(data["version"], ENVELOPE_VERSION)
        self.assertEqual(list(data), sorted(data))
        self.assertEqual(data["recipients"], ["carol@example.com"])
        self.assertEqual(
            data["attempts"],
            [
                {
                    "time": 1_800_000_100.0,
                    "host": "mx.example.net",
                    "reply": "451 try later",
                }
            ],
        )
        self.assertEqual(data["authUser"], "alice")

    def test_roundTrip(self) -> None:
        """
        An envelope loads back equal to itself.
        """
        self.assertEqual(Envelope.fromJSON(SAMPLE.toJSON()), SAMPLE)

    @settings(derandomize=True, max_examples=300)
    @given(envelopes)
    def test_roundTripProperty(self, envelope: Envelope) -> None:
        """
        Any envelope, with any text in its fields (controls, non-ASCII,
        quotes) and any recipients and attempts, loads back equal, with
        tuples for recipients and attempts.
        """
        loaded = Envelope.fromJSON(envelope.toJSON())
        self.assertEqual(loaded, envelope)
        self.assertIsInstance(loaded.recipients, tuple)
        self.assertIsInstance(loaded.attempts, tuple)
        for attempt in loaded.attempts:
            self.assertIsInstance(attempt, Attempt)

    def test_encodedOnce(self) -> None:
        """
        L{Envelope.toJSON} gives the same bytes each time without encoding
        again; the envelope still compares, copies and loads as before, and
        a changed copy encodes its own fields.
        """
        envelope = Envelope.fromJSON(SAMPLE.toJSON())
        first = envelope.toJSON()
        self.assertIs(envelope.toJSON(), first)
        self.assertEqual(envelope, SAMPLE)
        self.assertNotIn("_json", json.loads(first))
        changed = replace(envelope, sender="other@example.org")
        self.assertEqual(json.loads(changed.toJSON())["sender"], "other@example.org")
        self.assertEqual(Envelope.fromJSON(changed.toJSON()), changed)
        self.assertEqual(Envelope.fromJSON(envelope.toJSON()), envelope)

    def test_versionIgnored(self) -> None:
        """
        The version key is not part of the envelope, and an envelope without
        attempts or version still loads.
        """
        data = json.loads(SAMPLE.toJSON())
        del data["version"]
        del data["attempts"]
        self.assertEqual(Envelope.fromJSON(json.dumps(data).encode()), SAMPLE)

    def test_errors(self) -> None:
        """
        Malformed JSON, a non-object, a missing or unknown field, and
        malformed attempts are L{ValueError}s.
        """
        good = json.loads(SAMPLE.toJSON())
        missing = dict(good)
        del missing["sender"]
        unknown = dict(good, colour="blue")
        badAttempt = dict(good, attempts=[{"time": 1.0}])
        attemptNotObject = dict(good, attempts=[[1.0, "h", "r"]])
        attemptsNull = dict(good, attempts=None)
        recipientsNumber = dict(good, recipients=5)
        for raw in (
            b"",
            b"{",
            b"not json",
            b"[]",
            b"null",
            b'"envelope"',
            b"\xff\xfe",
            json.dumps(missing).encode(),
            json.dumps(unknown).encode(),
            json.dumps(badAttempt).encode(),
            json.dumps(attemptNotObject).encode(),
            json.dumps(attemptsNull).encode(),
            json.dumps(recipientsNumber).encode(),
        ):
            self.assertRaises(ValueError, Envelope.fromJSON, raw)

    def test_errorMessage(self) -> None:
        """
        The error says the envelope is bad.
        """
        with self.assertRaises(ValueError) as e:
            Envelope.fromJSON(b"[]")
        self.assertIn("envelope", str(e.exception))

    def test_recipientsNotAString(self) -> None:
        """
        A recipients string (a hand-edited envelope) is refused rather than
        being split into one-character recipients.
        """
        data = dict(json.loads(SAMPLE.toJSON()), recipients="bob@example.net")
        self.assertRaises(ValueError, Envelope.fromJSON, json.dumps(data).encode())


class WithAttemptTests(SynchronousTestCase):
    """
    Tests for L{Envelope.withAttempt}.
    """

    def test_appendsAndNarrows(self) -> None:
        """
        The copy has the attempt appended and only the remaining recipients;
        the original is unchanged.
        """
        first = Attempt(1.0, "mx1", "451 later")
        second = Attempt(2.0, "mx2", "250 ok")
        once = SAMPLE.withAttempt(first, ("carol@example.com",))
        twice = once.withAttempt(second, ())
        self.assertEqual(once.attempts, (first,))
        self.assertEqual(once.recipients, ("carol@example.com",))
        self.assertEqual(twice.attempts, (first, second))
        self.assertEqual(twice.recipients, ())
        self.assertEqual(SAMPLE.attempts, ())
        self.assertEqual(SAMPLE.recipients, ("bob@example.net", "carol@example.com"))
        self.assertEqual(twice.queueId, SAMPLE.queueId)
        self.assertEqual(twice.sender, SAMPLE.sender)

    def test_remainingAsTuple(self) -> None:
        """
        Remaining recipients given as a list are stored as a tuple, so the
        envelope stays hashable and equal to its reloaded self.
        """
        envelope = SAMPLE.withAttempt(
            Attempt(1.0, "mx", "451"),
            ["bob@example.net"],  # type: ignore[arg-type]
        )
        self.assertEqual(envelope.recipients, ("bob@example.net",))
        hash(envelope)
        self.assertEqual(Envelope.fromJSON(envelope.toJSON()), envelope)


class DeliveryReportTests(SynchronousTestCase):
    """
    Tests for L{DeliveryReport}.
    """

    def test_defaults(self) -> None:
        """
        A report starts empty, and reports do not share their dicts.
        """
        one, two = DeliveryReport(), DeliveryReport()
        self.assertEqual(
            (one.delivered, one.deferred, one.failed, one.host), ((), {}, {}, "")
        )
        self.assertIsNot(one.deferred, two.deferred)
        self.assertIsNot(one.failed, two.failed)
