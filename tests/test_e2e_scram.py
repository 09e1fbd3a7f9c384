"""
End-to-end tests of the SCRAM-SHA-256 and CRAM-MD5 mechanisms: the real relay
(C{twistd -n smtpauth-relay --config ...}) in a subprocess with an htpasswd
checker, driven over real sockets with smtplib (SCRAM through C{docmd} and
scramp's client, which smtplib lacks; CRAM-MD5 through its own C{login()}),
swaks, and the C{smtpauth-relay passwd} command.

One relay serves every test of the class; each test writes the password file
it needs (the checker reads it again when it changes).  Every connection
comes from its own loopback address, so lockouts of one test never touch
another.
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
import subprocess
import sys
import time

from scramp import ScramClient
from twisted.trial.unittest import SkipTest

from smtpauth_relay.htpasswd import setUser
from smtpauth_relay.passwords import CRAM_MD5, SCRAM_SHA_256, hashPassword
from tests.e2e_support import (
    CLIENT_NAME,
    HOST,
    IO_TIMEOUT,
    OTHER_PASSWORD,
    OTHER_USER,
    PASSWORD,
    REPO_ROOT,
    USER,
    RelayProcess,
    SharedRelayTestCase,
    b64,
    clientContext,
    loopbackAddresses,
    poll,
)

SWAKS = "/usr/bin/swaks"
MECHANISMS = ["PLAIN", "LOGIN", "SCRAM-SHA-256", "CRAM-MD5"]
ITERATIONS = 4096

nextSourceAddress = loopbackAddresses(79)


def unb64(data: bytes) -> str:
    return base64.b64decode(data).decode("utf-8")


class MechanismRelay(RelayProcess):
    """
    A relay whose C{[auth] mechanisms} allows all four mechanisms, and
    whose lockout locks a user after three failures.
    """

    def _writeConfig(self) -> None:
        super()._writeConfig()
        with open(self.configPath, encoding="utf-8") as f:
            text = f.read()
        allowed = ", ".join(f'"{m}"' for m in MECHANISMS)
        text = text.replace("[auth]\n", f"[auth]\nmechanisms = [{allowed}]\n", 1)
        with open(self.configPath, "w", encoding="utf-8") as f:
            f.write(text)


class ScramCramEndToEndTests(SharedRelayTestCase):
    """
    SCRAM-SHA-256 and CRAM-MD5 against the real relay.
    """

    @classmethod
    def makeRelay(cls) -> MechanismRelay:
        """
        A relay offering all four mechanisms, locking a user out after
        three failures.
        """
        return MechanismRelay(
            lockout={"max_failures": 3, "tarpit": 0.2, "session_max_failures": 10}
        )

    # -- helpers ------------------------------------------------------------

    def writeUsers(self, **schemes: str) -> None:
        """
        Give each user named an entry of the scheme named, replacing the
        password file.  Users who fail logins on purpose are used by one
        test only: three failures lock a user out.
        """
        passwords = {USER: PASSWORD, OTHER_USER: OTHER_PASSWORD}
        os.unlink(self.relay.users)
        for user, scheme in schemes.items():
            setUser(
                self.relay.users,
                user,
                hashPassword(
                    passwords.get(user, PASSWORD).encode(),
                    scheme=scheme,
                    rounds=4,
                    iterations=ITERATIONS,
                ),
            )

    def session(self) -> smtplib.SMTP:
        """
        A session after STARTTLS and EHLO.
        """
        client = smtplib.SMTP(
            HOST,
            self.relay.starttlsPort,
            local_hostname=CLIENT_NAME,
            timeout=IO_TIMEOUT,
            source_address=(nextSourceAddress(), 0),
        )
        self.addCleanup(self.closeQuietly, client)
        client.starttls(context=clientContext())
        client.ehlo()
        return client

    @staticmethod
    def closeQuietly(client: smtplib.SMTP) -> None:
        try:
            client.close()
        except OSError:
            pass

    def scram(
        self,
        client: smtplib.SMTP,
        user: str,
        password: str,
        initial: bool = True,
    ) -> tuple[int, bytes, str]:
        """
        Drive AUTH SCRAM-SHA-256 with scramp up to the client-final-message.

        @return: the reply to it, and the server-first-message.
        """
        scram = ScramClient(["SCRAM-SHA-256"], user, password)
        if initial:
            code, first = client.docmd(
                "AUTH", "SCRAM-SHA-256 " + b64(scram.get_client_first())
            )
        else:
            self.assertEqual(client.docmd("AUTH", "SCRAM-SHA-256"), (334, b""))
            code, first = client.docmd(b64(scram.get_client_first()))
        self.assertEqual(code, 334, first)
        serverFirst = unb64(first)
        scram.set_server_first(serverFirst)
        code, final = client.docmd(b64(scram.get_client_final()))
        if code == 334:
            # scramp checks the server signature: the relay knows the key.
            scram.set_server_final(unb64(final))
        return code, final, serverFirst

    def authLine(self, client: smtplib.SMTP) -> str:
        return client.esmtp_features.get("auth", "")

    # -- tests --------------------------------------------------------------

    def test_scramOfferedAndLogsIn(self) -> None:
        """
        With every user's entry SCRAM, EHLO offers SCRAM-SHA-256 (and never
        -PLUS); a SCRAM login with an initial response gets the server
        signature, then 235 2.7.0, and MAIL is accepted.
        """
        self.writeUsers(alice=SCRAM_SHA_256, bob=SCRAM_SHA_256)
        client = self.session()
        self.assertEqual(
            self.authLine(client).split(), ["PLAIN", "LOGIN", "SCRAM-SHA-256"]
        )
        code, final, _ = self.scram(client, USER, PASSWORD)
        self.assertEqual(code, 334)
        self.assertTrue(unb64(final).startswith("v="))
        self.assertEqual(client.docmd("")[0], 235)
        self.assertEqual(client.mail("alice@sender.example")[0], 250)
        poll(
            lambda: "AUTH SCRAM-SHA-256 ok for alice" in self.relay.log(),
            5,
            self.relay.log,
        )

    def test_scramWithoutInitialResponse(self) -> None:
        """
        C{AUTH SCRAM-SHA-256} alone gets an empty 334, then the exchange.
        """
        self.writeUsers(alice=SCRAM_SHA_256, bob=SCRAM_SHA_256)
        client = self.session()
        code, _, _ = self.scram(client, OTHER_USER, OTHER_PASSWORD, initial=False)
        self.assertEqual(code, 334)
        self.assertEqual(client.docmd("")[0], 235)

    def test_scramCancel(self) -> None:
        """
        C{*} cancels a SCRAM exchange with 501 5.7.0.
        """
        self.writeUsers(alice=SCRAM_SHA_256, bob=SCRAM_SHA_256)
        client = self.session()
        scram = ScramClient(["SCRAM-SHA-256"], USER, PASSWORD)
        self.assertEqual(
            client.docmd("AUTH", "SCRAM-SHA-256 " + b64(scram.get_client_first()))[0],
            334,
        )
        self.assertEqual(client.docmd("*"), (501, b"5.7.0 Authentication aborted"))

    def test_scramWrongPasswordCountsForLockout(self) -> None:
        """
        A wrong SCRAM password gets 535 5.7.8 and counts as a failed login:
        after three, even the right password (with PLAIN) is refused with
        454 4.7.0.
        """
        self.writeUsers(alice=SCRAM_SHA_256, bob=SCRAM_SHA_256, carol=SCRAM_SHA_256)
        for _ in range(3):
            code, text, _ = self.scram(self.session(), "carol", "wrong password")
            self.assertEqual(
                (code, text), (535, b"5.7.8 Authentication credentials invalid")
            )
        client = self.session()
        code, text = client.docmd("AUTH", "PLAIN " + b64(f"\0carol\0{PASSWORD}"))
        self.assertEqual(code, 454, text)
        self.assertIn("AUTH SCRAM-SHA-256 failed for carol", self.relay.log())

    def test_scramUnknownUserLooksTheSame(self) -> None:
        """
        An unknown user gets a server-first-message of the same shape (salt
        length, iteration count, nonce length), the same salt each time,
        and the same 535 5.7.8 in about the same time as a wrong password.
        """
        self.writeUsers(alice=SCRAM_SHA_256, dave=SCRAM_SHA_256)

        def attempt(user: str) -> tuple[float, int, bytes, dict[str, str]]:
            client = self.session()
            started = time.monotonic()
            code, text, first = self.scram(client, user, "wrong password")
            elapsed = time.monotonic() - started
            fields = dict(part.split("=", 1) for part in first.split(","))
            return elapsed, code, text, fields

        known = attempt("dave")
        unknown = attempt("mallory")
        again = attempt("mallory")
        self.assertEqual(known[1:3], (535, b"5.7.8 Authentication credentials invalid"))
        self.assertEqual(unknown[1:3], known[1:3])
        self.assertEqual(
            {k: len(v) for k, v in unknown[3].items()},
            {k: len(v) for k, v in known[3].items()},
        )
        self.assertEqual(unknown[3]["i"], str(ITERATIONS))
        self.assertEqual(again[3]["s"], unknown[3]["s"])
        self.assertNotEqual(again[3]["r"], unknown[3]["r"])
        self.assertLess(abs(unknown[0] - known[0]), 1.0)

    def test_ehloFilteredWithBcryptUser(self) -> None:
        """
        When one user of the file has only a bcrypt hash, neither
        SCRAM-SHA-256 nor CRAM-MD5 is offered, and asking for SCRAM gets
        504 5.5.4; PLAIN still works for the SCRAM user.
        """
        self.writeUsers(alice=SCRAM_SHA_256, bob="bcrypt")
        client = self.session()
        self.assertEqual(self.authLine(client).split(), ["PLAIN", "LOGIN"])
        self.assertEqual(client.docmd("AUTH", "SCRAM-SHA-256")[0], 504)
        self.assertEqual(
            client.docmd("AUTH", "PLAIN " + b64(f"\0{USER}\0{PASSWORD}"))[0], 235
        )

    def test_cramMD5WithSmtplib(self) -> None:
        """
        With every entry C{{CRAM-MD5}}, CRAM-MD5 is offered and smtplib's
        C{login()} (which prefers it) logs in with it.
        """
        self.writeUsers(alice=CRAM_MD5, erin=CRAM_MD5)
        client = self.session()
        self.assertEqual(self.authLine(client).split(), ["PLAIN", "LOGIN", "CRAM-MD5"])
        self.assertEqual(client.login(USER, PASSWORD)[0], 235)
        poll(
            lambda: "AUTH CRAM-MD5 ok for alice" in self.relay.log(),
            5,
            self.relay.log,
        )
        other = self.session()
        with self.assertRaises(smtplib.SMTPAuthenticationError) as raised:
            # smtplib tries CRAM-MD5, then PLAIN, then LOGIN: three failures.
            other.login("erin", "wrong password")
        self.assertEqual(raised.exception.smtp_code, 535)

    def test_cramMD5WithSwaks(self) -> None:
        """
        swaks logs in with CRAM-MD5 (C{-a CRAM-MD5}).
        """
        if not os.path.exists(SWAKS):
            raise SkipTest(f"swaks is not installed at {SWAKS}")
        self.writeUsers(alice=CRAM_MD5, bob=CRAM_MD5)
        result = subprocess.run(
            [
                SWAKS,
                "--server",
                HOST,
                "--port",
                str(self.relay.starttlsPort),
                "--tls",
                "-a",
                "CRAM-MD5",
                "--auth-user",
                USER,
                "--auth-password",
                PASSWORD,
                "--helo",
                CLIENT_NAME,
                "--local-interface",
                nextSourceAddress(),
                "--quit-after",
                "AUTH",
                "--timeout",
                "10",
            ],
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        output = result.stdout.decode(errors="replace")
        self.assertEqual(result.returncode, 0, output + result.stderr.decode())
        self.assertRegex(output, r"(?m)^<~\s*235 2\.7\.0")

    def test_passwdWritesEntriesThatLogIn(self) -> None:
        """
        C{smtpauth-relay passwd --scheme scram-sha-256} and C{--scheme
        cram-md5} write entries the running relay accepts for their
        mechanisms.
        """
        self.writeUsers()
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT

        def passwd(*argv: str) -> None:
            result = subprocess.run(
                [sys.executable, "-m", "smtpauth_relay.cli", "passwd", *argv],
                input=(PASSWORD + "\n").encode(),
                capture_output=True,
                env=env,
                timeout=60,
            )
            self.assertEqual(result.returncode, 0, result.stderr)

        passwd("--scheme", "scram-sha-256", self.relay.users, USER)
        with open(self.relay.users) as f:
            self.assertRegex(f.read(), re.escape(USER) + r":SCRAM-SHA-256\$10000:")
        client = self.session()
        self.assertIn("SCRAM-SHA-256", self.authLine(client).split())
        code, _, first = self.scram(client, USER, PASSWORD)
        self.assertEqual(code, 334)
        self.assertIn(",i=10000", first)
        self.assertEqual(client.docmd("")[0], 235)

        passwd("--scheme", "cram-md5", self.relay.users, USER)
        client = self.session()
        self.assertIn("CRAM-MD5", self.authLine(client).split())
        self.assertEqual(client.login(USER, PASSWORD)[0], 235)
