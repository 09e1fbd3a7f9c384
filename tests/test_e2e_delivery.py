"""
End-to-end tests of smarthost delivery: the real relay (C{twistd -n
smtpauth-relay}) in a subprocess, fed with smtplib over STARTTLS and AUTH,
delivering to a real upstream SMTP server that the tests run in a thread
(aiosmtpd, see L{tests.upstream_support}) over each TLS mode, with AUTH,
scripted per-recipient replies, outages, slowness and C{kill -9}.

Every test starts its own upstream and its own relay (about a second), with
C{retry_schedule = [1]} so that retries take a second, and waits with
deadlines, never with fixed sleeps.
"""

from __future__ import annotations

import email.message
import os
import smtplib
import sys
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.htpasswd import setUser
from smtpauth_relay.passwords import hashPassword
from tests.e2e_support import (
    CLIENT_NAME,
    HOST,
    HOSTNAME,
    IO_TIMEOUT,
    PASSWORD,
    QUEUED,
    USER,
    RelayProcess,
    clientContext,
    closeQuietly,
    loopbackAddresses,
    markedMessage,
    poll,
    queueCommand,
)

try:
    from tests.upstream_support import (
        REJECT_REPLY,
        TEMPFAIL_REPLY,
        CertificateAuthority,
        Transaction,
        Upstream,
    )
except ImportError as e:
    if not (e.name or "").startswith("aiosmtpd"):
        raise
    skipReason: str | None = (
        "aiosmtpd is not installed (it is a dev extra: pip install -e '.[dev]'); "
        "the smarthost tests need it as their upstream server"
    )
else:
    skipReason = None

log = Logger()

UPSTREAM_USER = "relay-e2e@provider.example"
UPSTREAM_PASSWORD = "upstream secret 42"

QUEUE = {"retry_schedule": [1], "max_concurrent_deliveries": 20}
"""C{[queue]} keys of every relay here: a retry a second after each failure."""

DELIVERY = {"connect_timeout": 5, "timeout": 30}
"""C{[delivery]} keys of every relay here: a stuck attempt fails in 30 s."""

WAIT = 20.0
"""Seconds to wait for something that should take one or two retries."""

nextSourceAddress = loopbackAddresses(78)


def splitReceived(content: bytes) -> tuple[bytes, bytes]:
    """
    Split what the upstream got into the relay's C{Received} header (first,
    with its continuation lines) and the rest.
    """
    lines = content.split(b"\r\n")
    end = 1
    while end < len(lines) and lines[end].startswith(b"\t"):
        end += 1
    received = b"\r\n".join(lines[:end]) + b"\r\n"
    return received, content[len(received) :]


def deliveryStatus(
    bounce: email.message.Message,
) -> tuple[email.message.Message, list[email.message.Message]]:
    """
    The per-message fields and the per-recipient field blocks of a bounce's
    C{message/delivery-status} part.
    """
    parts = [
        p for p in bounce.walk() if p.get_content_type() == "message/delivery-status"
    ]
    if len(parts) != 1:
        raise AssertionError(f"{len(parts)} delivery-status parts in {bounce}")
    blocks = parts[0].get_payload()
    assert isinstance(blocks, list)
    messages = [b for b in blocks if isinstance(b, email.message.Message)]
    assert len(messages) == len(blocks), blocks
    return messages[0], messages[1:]


class DeliveryHarness(SynchronousTestCase):
    """
    A real relay in smarthost mode and a real aiosmtpd upstream.
    """

    if skipReason is not None:
        skip = skipReason

    # -- set-up ---------------------------------------------------------------

    def makeUpstream(
        self, tls: str = "starttls", credentials: bool = True, **kwargs: Any
    ) -> Upstream:
        """
        An upstream (not started yet), removed after the test.
        """
        upstream = Upstream(
            tls=tls,
            username=UPSTREAM_USER if credentials else None,
            password=UPSTREAM_PASSWORD if credentials else None,
            **kwargs,
        )
        self.addCleanup(upstream.remove)
        return upstream

    def startUpstream(
        self, tls: str = "starttls", credentials: bool = True, **kwargs: Any
    ) -> Upstream:
        """
        A running upstream, stopped and removed after the test.
        """
        upstream = self.makeUpstream(tls, credentials, **kwargs)
        upstream.start()
        return upstream

    def startRelay(
        self,
        upstream: Upstream,
        queue: dict[str, object] | None = None,
        users: Iterable[tuple[str, str]] = (),
        **delivery: Any,
    ) -> RelayProcess:
        """
        A running relay whose smarthost is C{upstream}; C{delivery} are
        extra or replaced C{[delivery]} keys (C{host}, C{password} for a
        wrong one, ...), C{users} extra submission logins.
        """
        relay = RelayProcess(
            queue={**QUEUE, **(queue or {})},
            delivery=upstream.deliveryConfig(**{**DELIVERY, **delivery}),
        )
        self.addCleanup(relay.remove)
        for user, password in users:
            setUser(relay.users, user, hashPassword(password.encode(), rounds=4))
        relay.start()
        return relay

    def addresses(self, *kinds: str) -> tuple[str, list[str]]:
        """
        A sender and one recipient per kind (C{ok}, C{tempfail}, C{reject}:
        the upstream's script), used by this test alone.
        """
        tag = uuid.uuid4().hex[:8]
        name = self._testMethodName.replace("_", "-")
        sender = f"{name}-{tag}@sender.example"
        return sender, [f"{kind}-{tag}@rcpt.example" for kind in kinds]

    def session(
        self, relay: RelayProcess, user: str = USER, password: str = PASSWORD
    ) -> smtplib.SMTP:
        """
        An smtplib session with the relay after STARTTLS and AUTH.
        """
        client = smtplib.SMTP(
            HOST,
            relay.starttlsPort,
            local_hostname=CLIENT_NAME,
            timeout=IO_TIMEOUT,
            source_address=(nextSourceAddress(), 0),
        )
        self.addCleanup(closeQuietly, client)
        client.ehlo()
        client.starttls(context=clientContext())
        client.ehlo()
        client.login(user, password)
        return client

    def message(self, marker: str, body: bytes | None = None) -> bytes:
        """
        A small message (CRLF line ends) with C{marker} as its Subject and in
        its Message-ID; the default body has lines that need dot-stuffing.
        """
        if body is None:
            body = b"Hello.\r\n.a line with a leading dot\r\n..and two\r\n"
        return markedMessage(marker, body)

    def submit(
        self,
        client: smtplib.SMTP,
        message: bytes,
        sender: str,
        recipients: list[str],
        mailOptions: tuple[str, ...] = (),
    ) -> str:
        """
        MAIL, RCPT, DATA; the queue id of the 250.
        """
        code, text = client.mail(sender, list(mailOptions))
        self.assertEqual(code, 250, text)
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            self.assertEqual(code, 250, text)
        code, reply = client.data(message)
        match = QUEUED.match(reply.decode())
        self.assertEqual(code, 250, reply)
        assert match is not None, reply
        return match.group(1)

    # -- checks ---------------------------------------------------------------

    def waitForOne(
        self,
        upstream: Upstream,
        relay: RelayProcess,
        recipient: str,
        timeout: float = WAIT,
    ) -> Transaction:
        """
        Wait (up to C{timeout} seconds) for a transaction to C{recipient},
        then for the spool to be empty; return that transaction, which must
        be the only one to it.
        """
        upstream.waitForTransactions(
            lambda ts: any(recipient in t.recipients for t in ts),
            timeout,
            lambda: f"a message to {recipient}\n{relay.log()}",
        )
        relay.waitForEmptySpool(WAIT)
        found = [t for t in upstream.transactions() if recipient in t.recipients]
        self.assertEqual(len(found), 1, upstream.summary())
        return found[0]

    def assertDeliveredAsSubmitted(
        self,
        transaction: Transaction,
        message: bytes,
        queueId: str,
        sender: str,
        recipients: list[str],
    ) -> None:
        """
        The upstream got exactly the submitted message under the relay's
        C{Received} header (ESMTPSA: TLS and AUTH), from the right sender.
        """
        self.assertEqual(transaction.sender, sender)
        self.assertEqual(list(transaction.recipients), recipients)
        received, rest = splitReceived(transaction.content)
        self.assertEqual(rest, message, transaction.content)
        self.assertTrue(
            received.startswith(f"Received: from {CLIENT_NAME} ([".encode()),
            received,
        )
        self.assertIn(
            f"\tby {HOSTNAME} (smtpauth-relay) with ESMTPSA id {queueId}\r\n".encode(),
            received,
        )

    def assertSize(self, transaction: Transaction) -> None:
        """
        C{MAIL FROM} declared a C{SIZE=} that fits the message (the spool
        file's size: the message with LF line ends, before CRLF).
        """
        size = transaction.parameters.get("SIZE")
        self.assertIsNotNone(size, transaction.mailParameters)
        assert size is not None
        declared = int(size)
        lfSize = len(transaction.content.replace(b"\r\n", b"\n"))
        self.assertTrue(
            lfSize <= declared <= len(transaction.content),
            f"SIZE={declared}, message {len(transaction.content)} octets",
        )

    def logLines(self, relay: RelayProcess, queueId: str, word: str) -> list[str]:
        """
        The relay's log lines that name C{queueId} and contain C{word}.
        """
        return [
            line
            for line in relay.log().splitlines()
            if queueId in line and word in line
        ]

    def assertLogged(
        self, relay: RelayProcess, queueId: str, word: str, count: int = 1
    ) -> list[str]:
        """
        The relay logged C{count} events naming C{queueId} with C{word}.
        """
        lines = self.logLines(relay, queueId, word)
        self.assertEqual(
            len(lines),
            count,
            f"expected {count} log line(s) with {queueId} and {word!r}:\n"
            + relay.log(),
        )
        return lines

    def waitForAttempts(
        self, relay: RelayProcess, queueId: str, count: int
    ) -> dict[str, Any]:
        """
        Wait until C{queueId}'s envelope records C{count} attempts; return it.
        """
        return poll(
            lambda: (
                e
                if (e := relay.envelopes().get(queueId)) and len(e["attempts"]) >= count
                else None
            ),
            WAIT,
            lambda: (
                f"{count} attempts in {queueId}'s envelope: "
                f"{relay.envelopes().get(queueId)}\n{relay.log()}"
            ),
        )

    def assertStillQueued(self, relay: RelayProcess, queueId: str) -> None:
        """
        C{queued/ID.env} and C{ID.msg} are both there.
        """
        queued = os.path.join(relay.queueDirectory, "queued")
        for suffix in (".env", ".msg"):
            self.assertTrue(
                os.path.isfile(os.path.join(queued, queueId + suffix)),
                f"{queueId}{suffix} not in {os.listdir(queued)}",
            )

    def bounces(self, upstream: Upstream, sender: str) -> list[Transaction]:
        """
        The transactions with the null sender to C{sender}.
        """
        return [
            t
            for t in upstream.transactions()
            if t.sender == "" and list(t.recipients) == [sender]
        ]

    def assertBounce(
        self,
        transaction: Transaction,
        sender: str,
        marker: str,
        queueId: str,
        expected: dict[str, tuple[str, str]],
    ) -> None:
        """
        C{transaction} is an RFC 3464 bounce to C{sender} about the message
        C{marker} (queued as C{queueId}), reporting exactly the recipients
        of C{expected}, each with its C{(Action, Status)}.
        """
        self.assertEqual(transaction.parameters.get("AUTH"), "<>")
        bounce = transaction.message()
        self.assertEqual(bounce.get_content_type(), "multipart/report")
        self.assertEqual(bounce.get_param("report-type"), "delivery-status")
        head = b"\r\n" + transaction.content.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        self.assertIn(f"\r\nTo: <{sender}>\r\n".encode(), head)
        self.assertIn(
            f"\r\nFrom: Mail Delivery System <MAILER-DAEMON@{HOSTNAME}>\r\n".encode(),
            head,
        )
        self.assertEqual(bounce["Auto-Submitted"], "auto-replied")
        kinds = [p.get_content_type() for p in bounce.iter_parts()]
        self.assertEqual(
            kinds, ["text/plain", "message/delivery-status", "text/rfc822-headers"]
        )
        perMessage, perRecipient = deliveryStatus(bounce)
        self.assertEqual(perMessage["Reporting-MTA"], f"dns; {HOSTNAME}")
        self.assertEqual(perMessage["X-Queue-ID"], queueId)
        reported = {
            str(block["Final-Recipient"]): (str(block["Action"]), str(block["Status"]))
            for block in perRecipient
        }
        self.assertEqual(
            reported, {f"rfc822; {r}": v for r, v in expected.items()}, str(bounce)
        )
        headers = list(bounce.iter_parts())[2].get_payload(decode=True)
        assert isinstance(headers, bytes)
        self.assertIn(b"Subject: " + marker.encode(), headers)
        self.assertIn(
            b"Message-ID: <" + marker.encode() + b"@client.e2e.test>", headers
        )
        self.assertNotIn(b"Hello.", headers)

    def report(self, name: str, value: object) -> None:
        """
        A measurement for whoever runs the tests: in the test log, and on
        stderr.
        """
        log.info("measured {name}: {value}", name=name, value=value)
        sys.stderr.write(f"\n[{self.id()}] measured {name}: {value}\n")

    # -- delivery over each TLS mode ------------------------------------------


class SmarthostDeliveryTests(DeliveryHarness):
    """
    Messages submitted to the relay reach the smarthost, and what does not
    get there is kept, retried, bounced or expired as the README says.
    """

    def test_starttlsVerifiedWithAuth(self) -> None:
        """
        With C{tls = "starttls"}, the smarthost's certificate checked for
        C{host = "localhost"} against C{ca_file}, and a login: the message
        reaches the upstream over TLS after AUTH with the configured login,
        byte for byte under our C{Received} (C{with ESMTPSA}), with
        C{AUTH=<>} and C{SIZE=} on C{MAIL FROM}; the spool is then empty and
        the relay logged one delivery.
        """
        upstream = self.startUpstream("starttls")
        relay = self.startRelay(upstream)
        sender, recipients = self.addresses("ok")
        marker = f"e2e-starttls-{uuid.uuid4().hex}"
        message = self.message(marker)
        queueId = self.submit(self.session(relay), message, sender, recipients)

        transaction = self.waitForOne(upstream, relay, recipients[0])
        self.assertDeliveredAsSubmitted(
            transaction, message, queueId, sender, recipients
        )
        self.assertIsNotNone(transaction.tls)
        self.assertEqual(transaction.login, UPSTREAM_USER)
        self.assertIn(transaction.mechanism, ("PLAIN", "LOGIN"))
        self.assertEqual(transaction.parameters.get("AUTH"), "<>")
        self.assertNotIn("BODY", transaction.parameters)
        self.assertSize(transaction)
        self.assertEqual(relay.spoolFiles(), [])
        self.assertLogged(relay, queueId, f"delivered to <{recipients[0]}>")
        self.assertLogged(relay, queueId, "deferred", 0)

    def test_implicitTLS(self) -> None:
        """
        With C{tls = "implicit"} the relay speaks TLS from the first byte
        (no STARTTLS), verifies the certificate and logs in; an 8-bit body
        submitted with C{BODY=8BITMIME} arrives unchanged with
        C{BODY=8BITMIME} on C{MAIL FROM}.
        """
        upstream = self.startUpstream("implicit")
        relay = self.startRelay(upstream)
        sender, recipients = self.addresses("ok")
        marker = f"e2e-implicit-{uuid.uuid4().hex}"
        message = self.message(marker, "Grüße, café.\r\n".encode())
        queueId = self.submit(
            self.session(relay), message, sender, recipients, ("BODY=8BITMIME",)
        )

        transaction = self.waitForOne(upstream, relay, recipients[0])
        self.assertDeliveredAsSubmitted(
            transaction, message, queueId, sender, recipients
        )
        self.assertIsNotNone(transaction.tls)
        self.assertEqual(transaction.login, UPSTREAM_USER)
        self.assertEqual(transaction.parameters.get("BODY"), "8BITMIME")
        self.assertEqual(transaction.parameters.get("AUTH"), "<>")
        self.assertSize(transaction)
        self.assertLogged(relay, queueId, f"delivered to <{recipients[0]}>")

    def test_plainWithoutCredentials(self) -> None:
        """
        With C{tls = "none"} and no login (an upstream that offers neither
        TLS nor AUTH, such as a smarthost on the local network), the message
        is delivered in the clear without AUTH, and so without C{AUTH=} on
        C{MAIL FROM} (RFC 4954: only to servers offering AUTH).
        """
        upstream = self.startUpstream("none", credentials=False)
        relay = self.startRelay(upstream, host=HOST)
        sender, recipients = self.addresses("ok", "ok2")
        marker = f"e2e-plain-{uuid.uuid4().hex}"
        message = self.message(marker)
        queueId = self.submit(self.session(relay), message, sender, recipients)

        transaction = self.waitForOne(upstream, relay, recipients[0])
        self.assertDeliveredAsSubmitted(
            transaction, message, queueId, sender, recipients
        )
        self.assertIsNone(transaction.tls)
        self.assertIsNone(transaction.login)
        self.assertNotIn("AUTH", transaction.parameters)
        self.assertSize(transaction)
        self.assertEqual(upstream.commands("AUTH"), [])
        for recipient in recipients:
            self.assertLogged(relay, queueId, f"delivered to <{recipient}>")

    def test_forwardAuthIdentity(self) -> None:
        """
        With C{forward_auth_identity = true} the upstream learns who
        submitted the message: C{AUTH=} on C{MAIL FROM} names the
        submitter's login, xtext-encoded (C{+} and C{=} as C{+2B} and
        C{+3D}, RFC 3461).
        """
        submitter = "ops+mail=desk@office.example"
        secret = "desk password"
        upstream = self.startUpstream("starttls")
        relay = self.startRelay(
            upstream, users=[(submitter, secret)], forward_auth_identity=True
        )
        sender, recipients = self.addresses("ok")
        marker = f"e2e-identity-{uuid.uuid4().hex}"
        message = self.message(marker)
        client = self.session(relay, submitter, secret)
        queueId = self.submit(client, message, sender, recipients)

        transaction = self.waitForOne(upstream, relay, recipients[0])
        self.assertDeliveredAsSubmitted(
            transaction, message, queueId, sender, recipients
        )
        self.assertEqual(
            transaction.parameters.get("AUTH"), "ops+2Bmail+3Ddesk@office.example"
        )
        self.assertEqual(transaction.login, UPSTREAM_USER)

    # -- what keeps a message queued ------------------------------------------

    def assertKeptQueued(
        self, upstream: Upstream, relay: RelayProcess, words: tuple[str, ...]
    ) -> dict[str, Any]:
        """
        Submit a message; it is tried at least twice, each attempt recorded
        in its envelope with a reply containing one of C{words} and logged
        as deferred, and stays in the spool; the upstream never got a
        C{MAIL} (and so nothing was delivered).  Return its envelope.
        """
        sender, recipients = self.addresses("ok")
        marker = f"e2e-kept-{uuid.uuid4().hex}"
        queueId = self.submit(
            self.session(relay), self.message(marker), sender, recipients
        )
        envelope = self.waitForAttempts(relay, queueId, 2)
        self.assertStillQueued(relay, queueId)
        self.assertEqual(envelope["recipients"], recipients)
        for attempt in envelope["attempts"]:
            self.assertTrue(
                any(w in attempt["reply"] for w in words),
                f"none of {words} in {attempt['reply']!r}",
            )
        poll(
            lambda: (
                len(self.logLines(relay, queueId, "deferred"))
                >= len(envelope["attempts"])
            ),
            WAIT,
            lambda: f"a deferred event per attempt:\n{relay.log()}",
        )
        self.assertEqual(upstream.commands("MAIL"), [])
        self.assertEqual(upstream.transactions(), [])
        self.assertEqual(self.logLines(relay, queueId, "delivered"), [])
        return envelope

    def test_certificateForOtherNameKeepsMessageQueued(self) -> None:
        """
        A smarthost whose certificate (from the trusted CA) names another
        host is not used: the message stays queued with the failed attempts
        in its envelope, and the password was never sent (no AUTH seen).
        """
        upstream = self.startUpstream(
            "starttls", certificateNames=("other-host.example",)
        )
        relay = self.startRelay(upstream)
        self.assertKeptQueued(
            upstream,
            relay,
            ("Verification", "DNSMismatch", "certificate verify failed"),
        )
        self.assertEqual(upstream.commands("AUTH"), [])

    def test_untrustedCAKeepsMessageQueued(self) -> None:
        """
        A smarthost whose certificate is for the right name but from a CA
        that C{ca_file} does not hold is not used either (implicit TLS
        here): the message stays queued, no AUTH was attempted.
        """
        upstream = self.startUpstream("implicit")
        otherCA = CertificateAuthority(upstream.directory, name="some other CA")
        relay = self.startRelay(upstream, ca_file=otherCA.certificatePath)
        self.assertKeptQueued(
            upstream,
            relay,
            ("Verification", "DNSMismatch", "certificate verify failed"),
        )
        self.assertEqual(upstream.commands("AUTH"), [])

    def test_starttlsRequiredOfUpstream(self) -> None:
        """
        With C{tls = "starttls"} a smarthost that does not offer STARTTLS is
        not used (no fallback to plain text): the message stays queued and
        the upstream never sees a C{MAIL}.
        """
        upstream = self.startUpstream("none", credentials=False)
        relay = self.startRelay(
            upstream, tls="starttls", ca_file=upstream.authority.certificatePath
        )
        self.assertKeptQueued(upstream, relay, ("TLS", "STARTTLS", "tls"))

    def test_upstreamAuthFailureKeepsMessageQueued(self) -> None:
        """
        With a wrong password in C{password_file}, the upstream answers AUTH
        with 535: the message stays queued (an AUTH failure is temporary for
        the queue: the admin can fix the password), the 535 is in every
        recorded attempt, and nothing was delivered.
        """
        upstream = self.startUpstream("starttls")
        relay = self.startRelay(upstream, password="not the password")
        self.assertKeptQueued(upstream, relay, ("535",))
        auths = upstream.commands("AUTH")
        self.assertTrue(auths)
        self.assertEqual(
            {(a.argument, a.reply.split()[-1]) for a in auths}, {(UPSTREAM_USER, "535")}
        )

    def test_failedAttemptRecordsUpstreamHost(self) -> None:
        """
        An attempt that fails before any recipient is answered (here: AUTH
        refused) is recorded in the envelope with the host it talked to,
        and its log event names that host ("via localhost"), as for every
        other attempt; the reply does not repeat the host.
        """
        upstream = self.startUpstream("starttls")
        relay = self.startRelay(upstream, password="not the password")
        sender, recipients = self.addresses("ok")
        marker = f"e2e-host-{uuid.uuid4().hex}"
        queueId = self.submit(
            self.session(relay), self.message(marker), sender, recipients
        )
        envelope = self.waitForAttempts(relay, queueId, 1)
        (attempt, *_) = envelope["attempts"]
        problems = []
        if attempt["host"] != "localhost":
            problems.append(f"attempt host {attempt['host']!r}, not 'localhost'")
        if attempt["reply"].count("localhost") > 1:
            problems.append(f"reply names the host twice: {attempt['reply']!r}")
        deferred = poll(
            lambda: self.logLines(relay, queueId, "deferred"),
            WAIT,
            lambda: f"a deferred event for {queueId}:\n{relay.log()}",
        )
        if "via localhost" not in deferred[0]:
            problems.append(f"log event without the host: {deferred[0]!r}")
        self.assertEqual(problems, [])

    # -- per-recipient results, retries, bounces, expiry ----------------------

    def test_mixedRecipients(self) -> None:
        """
        One message to a recipient the upstream takes, one it refuses for
        now (451) and one it refuses for good (550): the first is delivered
        once; the sender gets one RFC 3464 bounce for the 550 recipient
        only (through the same smarthost, C{MAIL FROM:<>}, Status 5.1.1,
        the original headers attached); the 451 recipient stays queued, is
        retried, and once the upstream takes it is delivered exactly once.
        Each outcome is one log event.
        """
        upstream = self.startUpstream("starttls")
        relay = self.startRelay(upstream)
        sender, recipients = self.addresses("ok", "tempfail", "reject")
        ok, tempfail, reject = recipients
        marker = f"e2e-mixed-{uuid.uuid4().hex}"
        message = self.message(marker)
        queueId = self.submit(self.session(relay), message, sender, recipients)

        upstream.waitForTransactions(
            lambda ts: bool(self.bounces(upstream, sender)),
            WAIT,
            lambda: f"a bounce to {sender}\n{relay.log()}",
        )
        envelope = self.waitForAttempts(relay, queueId, 2)
        self.assertEqual(envelope["recipients"], [tempfail])
        self.assertIn(TEMPFAIL_REPLY, envelope["attempts"][-1]["reply"])
        toOk = [t for t in upstream.transactions() if ok in t.recipients]
        self.assertEqual(len(toOk), 1, upstream.summary())
        self.assertDeliveredAsSubmitted(toOk[0], message, queueId, sender, [ok])
        self.assertEqual(
            [t for t in upstream.transactions() if tempfail in t.recipients], []
        )

        bounces = self.bounces(upstream, sender)
        self.assertEqual(len(bounces), 1, upstream.summary())
        self.assertBounce(
            bounces[0], sender, marker, queueId, {reject: ("failed", "5.1.1")}
        )
        perMessage, (block,) = deliveryStatus(bounces[0].message())
        self.assertEqual(block["Remote-MTA"], "dns; localhost")
        self.assertEqual(block["Diagnostic-Code"], f"smtp; {REJECT_REPLY}")

        upstream.tempfailing = False
        toTempfail = self.waitForOne(upstream, relay, tempfail)
        self.assertDeliveredAsSubmitted(
            toTempfail, message, queueId, sender, [tempfail]
        )
        self.assertEqual(len(self.bounces(upstream, sender)), 1)
        self.assertEqual(
            len([t for t in upstream.transactions() if ok in t.recipients]), 1
        )
        self.assertLogged(relay, queueId, f"delivered to <{ok}>")
        self.assertLogged(relay, queueId, f"delivered to <{tempfail}>")
        self.assertLogged(relay, queueId, f"to <{reject}> bounced: 550")
        refusals = [
            c
            for c in upstream.commands("RCPT")
            if c.argument == tempfail and c.reply.startswith("451")
        ]
        self.assertLogged(relay, queueId, "deferred", len(refusals))

    def test_tempfailThenSuccess(self) -> None:
        """
        An upstream that answers 451 to every C{MAIL FROM} for a while: the
        message waits in the queue with each attempt and its 451 recorded in
        the envelope (one "deferred" log event per attempt), and is delivered
        exactly once as soon as the upstream takes mail again.
        """
        upstream = self.startUpstream("starttls")
        upstream.tempfailAll = True
        relay = self.startRelay(upstream)
        sender, recipients = self.addresses("ok")
        marker = f"e2e-4xx-{uuid.uuid4().hex}"
        message = self.message(marker)
        queueId = self.submit(self.session(relay), message, sender, recipients)

        envelope = self.waitForAttempts(relay, queueId, 2)
        self.assertStillQueued(relay, queueId)
        for attempt in envelope["attempts"]:
            self.assertIn("451 4.3.0", attempt["reply"])
            self.assertEqual(attempt["host"], "localhost")
        self.assertGreater(envelope["nextAttempt"], envelope["attempts"][-1]["time"])
        self.assertEqual(upstream.transactions(), [])

        upstream.tempfailAll = False
        transaction = self.waitForOne(upstream, relay, recipients[0])
        self.assertDeliveredAsSubmitted(
            transaction, message, queueId, sender, recipients
        )
        refused = [
            c
            for c in upstream.commands("MAIL")
            if c.argument == sender and c.reply.startswith("451")
        ]
        self.assertGreaterEqual(len(refused), 2)
        self.assertLogged(relay, queueId, "deferred", len(refused))
        self.assertLogged(relay, queueId, "delivered", 1)
        self.assertEqual(self.bounces(upstream, sender), [])

    def test_dataRefusedTemporarily(self) -> None:
        """
        An upstream that accepts both recipients but answers the data with
        451 has not taken the message: both recipients stay queued with the
        451 recorded, and once it takes the data the message is delivered
        exactly once, to both, in one transaction.
        """
        upstream = self.startUpstream("starttls")
        upstream.dataReply = "451 4.3.0 queue file write error"
        relay = self.startRelay(upstream)
        sender, recipients = self.addresses("ok", "ok2")
        marker = f"e2e-data451-{uuid.uuid4().hex}"
        message = self.message(marker)
        queueId = self.submit(self.session(relay), message, sender, recipients)

        envelope = self.waitForAttempts(relay, queueId, 2)
        self.assertEqual(envelope["recipients"], recipients)
        self.assertIn(
            "451 4.3.0 queue file write error", envelope["attempts"][0]["reply"]
        )
        self.assertEqual(upstream.transactions(), [])

        upstream.dataReply = None
        transaction = self.waitForOne(upstream, relay, recipients[0])
        self.assertDeliveredAsSubmitted(
            transaction, message, queueId, sender, recipients
        )
        self.assertEqual(len(upstream.transactions()), 1, upstream.summary())
        self.assertEqual(self.bounces(upstream, sender), [])

    def test_dataRefusedPermanently(self) -> None:
        """
        An upstream that accepts both recipients and then refuses the data
        with 554 refuses it for both: the sender gets one bounce naming both
        (Status 5.6.0), and the message leaves the queue.
        """
        upstream = self.startUpstream("starttls")
        upstream.dataReply = "554 5.6.0 message content rejected"
        relay = self.startRelay(upstream)
        sender, recipients = self.addresses("ok", "ok2")
        marker = f"e2e-data554-{uuid.uuid4().hex}"
        queueId = self.submit(
            self.session(relay), self.message(marker), sender, recipients
        )
        upstream.waitForTransactions(
            lambda ts: bool(self.bounces(upstream, sender)),
            WAIT,
            lambda: f"a bounce to {sender}\n{relay.log()}",
        )
        relay.waitForEmptySpool(WAIT)
        (bounce,) = self.bounces(upstream, sender)
        self.assertBounce(
            bounce,
            sender,
            marker,
            queueId,
            {r: ("failed", "5.6.0") for r in recipients},
        )
        self.assertEqual(upstream.transactions(), [bounce])
        for recipient in recipients:
            self.assertLogged(relay, queueId, f"to <{recipient}> bounced: 554")

    def test_expiryBouncesWithDelayStatus(self) -> None:
        """
        With C{max_lifetime = 3} and a recipient the upstream refuses with
        451 for ever, the other recipient is delivered at once and, after
        about three seconds, the sender gets one bounce for the refused one:
        Action failed, Status 4.2.0 (the upstream's own code); the message
        then leaves the spool, never delivered to that recipient.
        """
        upstream = self.startUpstream("starttls")
        relay = self.startRelay(upstream, queue={"max_lifetime": 3})
        sender, recipients = self.addresses("ok", "tempfail")
        ok, tempfail = recipients
        marker = f"e2e-expiry-{uuid.uuid4().hex}"
        queueId = self.submit(
            self.session(relay), self.message(marker), sender, recipients
        )

        upstream.waitForTransactions(
            lambda ts: bool(self.bounces(upstream, sender)),
            WAIT,
            lambda: f"a bounce to {sender}\n{relay.log()}",
        )
        relay.waitForEmptySpool(WAIT)
        (bounce,) = self.bounces(upstream, sender)
        self.assertBounce(
            bounce, sender, marker, queueId, {tempfail: ("failed", "4.2.0")}
        )
        self.assertIn(b"expired", bounce.content)
        self.assertEqual(
            len([t for t in upstream.transactions() if ok in t.recipients]), 1
        )
        self.assertEqual(
            [t for t in upstream.transactions() if tempfail in t.recipients], []
        )
        self.assertLogged(relay, queueId, f"to <{tempfail}> expired")
        self.assertGreaterEqual(len(self.logLines(relay, queueId, "deferred")), 2)

    def test_nullSenderNeverBounced(self) -> None:
        """
        A message with the null sender (C{MAIL FROM:<>}, itself a
        notification) whose recipient the upstream refuses with 550 leaves
        the queue without any bounce: the only thing the upstream ever gets
        is the same message's delivery to its other recipient.
        """
        upstream = self.startUpstream("starttls")
        relay = self.startRelay(upstream)
        _, recipients = self.addresses("ok", "reject")
        ok, reject = recipients
        marker = f"e2e-null-{uuid.uuid4().hex}"
        message = self.message(marker)
        queueId = self.submit(self.session(relay), message, "", recipients)

        transaction = self.waitForOne(upstream, relay, ok)
        self.assertDeliveredAsSubmitted(transaction, message, queueId, "", [ok])
        poll(
            lambda: self.logLines(relay, queueId, f"to <{reject}> bounced"),
            WAIT,
            lambda: f"the 550 to be logged:\n{relay.log()}",
        )
        self.assertLogged(relay, queueId, "not sent (null sender)")
        relay.waitForEmptySpool(WAIT)
        self.assertEqual(upstream.transactions(), [transaction], upstream.summary())

    # -- bursts and crashes ---------------------------------------------------

    def test_burstWhileUpstreamDownReusesConnections(self) -> None:
        """
        100 messages submitted (5 sessions of 20) while the upstream is down
        stay queued with their failed attempts recorded; when it comes back
        every one is delivered exactly once, over far fewer connections than
        messages (each connection carries many, RSET between;
        C{max_per_destination = 2}).
        """
        upstream = self.makeUpstream("starttls")
        relay = self.startRelay(upstream, max_per_destination=2)
        sender, recipients = self.addresses("ok")
        tag = uuid.uuid4().hex[:8]
        markers = [f"e2e-burst-{tag}-{i:03d}" for i in range(100)]
        queueIds = []
        for session in range(5):
            client = self.session(relay)
            for marker in markers[session * 20 : (session + 1) * 20]:
                queueIds.append(
                    self.submit(client, self.message(marker), sender, recipients)
                )
            client.quit()
        poll(
            lambda: all(
                (e := relay.envelopes().get(q)) and e["attempts"] for q in queueIds
            ),
            WAIT,
            lambda: f"an attempt for each of the 100 messages\n{relay.log()[-3000:]}",
        )
        self.assertEqual(upstream.transactions(), [])

        upstream.start()
        expected = {f"<{m}@client.e2e.test>" for m in markers}
        upstream.waitForTransactions(
            lambda ts: expected <= {t.messageId for t in ts},
            60,
            lambda: f"all 100 messages; spool {len(relay.spoolFiles())} files",
        )
        relay.waitForEmptySpool(WAIT)
        counts = Counter(t.messageId for t in upstream.transactions())
        self.assertEqual(set(counts), expected)
        self.assertEqual(
            {m: n for m, n in counts.items() if n != 1}, {}, "delivered more than once"
        )
        connections = upstream.connections
        self.report("upstream connections for a burst of 100 messages", connections)
        self.assertLessEqual(
            connections,
            20,
            f"{connections} upstream connections for 100 messages\n"
            + upstream.summary(),
        )
        for queueId in queueIds[:3]:
            self.assertLogged(relay, queueId, "delivered", 1)
            self.assertGreaterEqual(len(self.logLines(relay, queueId, "deferred")), 1)

    def test_upstreamGoesDownMidDelivery(self) -> None:
        """
        The upstream goes down while the relay is sending it messages (one
        of them taken but its 250 never sent), stays down for a few retries
        and comes back: every message is delivered, none lost.
        """
        upstream = self.startUpstream("starttls")
        upstream.dataDelay = 1.0
        relay = self.startRelay(upstream)
        sender, recipients = self.addresses("ok")
        tag = uuid.uuid4().hex[:8]
        markers = [f"e2e-down-{tag}-{i}" for i in range(6)]
        client = self.session(relay)
        queueIds = [
            self.submit(client, self.message(m), sender, recipients) for m in markers
        ]
        closeQuietly(client)
        upstream.waitForTransactions(lambda ts: len(ts) >= 1, WAIT, relay.log)
        upstream.stop()
        upstream.dataDelay = 0.0
        poll(
            lambda: (
                all(
                    (e := relay.envelopes().get(q)) is None or len(e["attempts"]) >= 2
                    for q in queueIds
                )
                and relay.envelopes()
            ),
            WAIT,
            lambda: f"two failed attempts each: {relay.envelopes()}",
        )

        upstream.start()
        expected = {f"<{m}@client.e2e.test>" for m in markers}
        upstream.waitForTransactions(
            lambda ts: expected <= {t.messageId for t in ts},
            WAIT,
            lambda: f"all 6 messages\n{relay.log()[-3000:]}",
        )
        relay.waitForEmptySpool(WAIT)
        counts = Counter(t.messageId for t in upstream.transactions())
        self.assertEqual(set(counts), expected)

    def test_hungUpstreamDoesNotBlockRecovery(self) -> None:
        """
        An upstream that takes connections but never greets costs each
        attempt no more than C{[delivery] timeout} (2 s here): the message
        is deferred with that reason.  Once the upstream greets new
        connections again, the message is delivered at the next retry, not
        held back behind the hung connections until their 300 s reply
        timeout.
        """
        upstream = self.startUpstream("starttls")
        upstream.hanging = True
        relay = self.startRelay(upstream, timeout=2)
        sender, recipients = self.addresses("ok")
        marker = f"e2e-hung-{uuid.uuid4().hex}"
        message = self.message(marker)
        queueId = self.submit(self.session(relay), message, sender, recipients)
        envelope = self.waitForAttempts(relay, queueId, 2)
        for attempt in envelope["attempts"]:
            self.assertIn("no connection took the message within 2s", attempt["reply"])
        self.assertEqual(upstream.connections, 0)

        upstream.hanging = False
        # The next attempt starts within a second and needs well under one.
        transaction = self.waitForOne(upstream, relay, recipients[0], timeout=10)
        self.assertDeliveredAsSubmitted(
            transaction, message, queueId, sender, recipients
        )

    def test_kill9MidDeliveryLosesNothing(self) -> None:
        """
        C{kill -9} of the relay while it is sending 20 messages to a slow
        upstream (half a second to answer each), then a restart with the
        same configuration: the spool empties and every message reached the
        upstream at least once.  At-least-once means a message the upstream
        took just before the kill (its 250 never heard) is sent again: the
        duplicates are counted and reported, not failed.
        """
        upstream = self.startUpstream("starttls")
        upstream.dataDelay = 0.5
        relay = self.startRelay(upstream, max_per_destination=2)
        sender, recipients = self.addresses("ok")
        tag = uuid.uuid4().hex[:8]
        markers = [f"e2e-kill-{tag}-{i:02d}" for i in range(20)]
        client = self.session(relay)
        for marker in markers:
            self.submit(client, self.message(marker), sender, recipients)
        closeQuietly(client)
        before = upstream.waitForTransactions(
            lambda ts: len(ts) >= 3, WAIT, lambda: relay.log()
        )
        relay.kill9()
        self.assertLess(len(before), 20, "all delivered before the kill")
        self.assertTrue(relay.spoolFiles(), "nothing left to deliver after the kill")

        relay.start()
        expected = {f"<{m}@client.e2e.test>" for m in markers}
        upstream.waitForTransactions(
            lambda ts: expected <= {t.messageId for t in ts},
            40,
            lambda: f"all 20 messages\n{relay.log()[-3000:]}",
        )
        relay.waitForEmptySpool(WAIT)
        counts = Counter(t.messageId for t in upstream.transactions())
        self.assertEqual(set(counts), expected, "lost messages")
        duplicates = sum(counts.values()) - len(expected)
        self.report(
            "duplicates after kill -9 mid-delivery (20 messages, "
            f"{len(before)} taken before the kill)",
            duplicates,
        )


class QueueAdminTests(DeliveryHarness):
    """
    C{smtpauth-relay queue} against the running relay, as an admin uses it.
    """

    def queueCommand(self, relay: RelayProcess, *args: str) -> tuple[int, str]:
        return queueCommand(relay, *args)

    def test_listShowFlushBounceDelete(self) -> None:
        """
        With the smarthost down, queued messages are listed (id, sender,
        last error) and shown; flush makes the relay try again at once;
        bounce sends the sender a DSN (through the smarthost once it is back)
        and empties the message from the queue; delete removes one silently.
        """
        upstream = self.makeUpstream("starttls")
        relay = self.startRelay(upstream, queue={"retry_schedule": [3600]})
        sender, recipients = self.addresses("ok")
        client = self.session(relay)
        first = self.submit(client, self.message("admin-1"), sender, recipients)
        second = self.submit(client, self.message("admin-2"), sender, recipients)
        self.waitForAttempts(relay, first, 1)
        self.waitForAttempts(relay, second, 1)

        code, listing = self.queueCommand(relay, "list")
        self.assertEqual(code, 0, listing)
        self.assertIn(first, listing)
        self.assertIn(second, listing)
        self.assertIn(recipients[0], listing)
        self.assertIn("2 messages", listing)

        code, shown = self.queueCommand(relay, "show", first)
        self.assertEqual(code, 0, shown)
        self.assertIn(recipients[0], shown)
        self.assertIn("Subject: admin-1", shown)

        code, flushed = self.queueCommand(relay, "flush")
        self.assertEqual((code, flushed.strip()), (0, "OK 2 scheduled"))
        self.waitForAttempts(relay, first, 2)

        code, deleted = self.queueCommand(relay, "delete", second)
        self.assertEqual((code, deleted.strip()), (0, f"OK deleted {second}"))

        upstream.start()
        code, bounced = self.queueCommand(relay, "bounce", first)
        self.assertEqual((code, bounced.strip()), (0, f"OK bounced {first}"))
        relay.waitForEmptySpool()
        (dsn,) = poll(
            lambda: self.bounces(upstream, sender),
            WAIT,
            lambda: f"a bounce to {sender}:\n{relay.log()}",
        )
        self.assertIn(b"delivery abandoned by the administrator", dsn.content)
        self.assertFalse(
            any(b"admin-" in t.content for t in upstream.transactions() if t.sender)
        )

        code, unknown = self.queueCommand(relay, "delete", first)
        self.assertEqual(code, 1, unknown)
