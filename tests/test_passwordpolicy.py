"""
Tests for L{smtpauth_relay.passwordpolicy}.
"""

from __future__ import annotations

import hashlib

from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.passwordpolicy import (
    MIN_LENGTH,
    MIN_SCORE,
    checkPassword,
    commonPasswords,
    domainLabels,
)

STRONG = "vivid quartz lantern"
"""
A passphrase zxcvbn scores 4.
"""

LEET = "Z4nz1b4r0v!!"
"""
A password zxcvbn scores 3 on its own, but 1 once it knows that someone is
called, or works at, Zanzibarov.
"""


def randomLooking(length: int) -> str:
    """
    A password of C{length} hexadecimal digits that looks random, and is the
    same in every run.
    """
    digits = "".join(
        hashlib.sha256(str(i).encode()).hexdigest() for i in range(length // 64 + 1)
    )
    return digits[:length]


class CheckPasswordTests(SynchronousTestCase):
    """
    Tests for L{checkPassword}.
    """

    def assertGuessable(self, reasons: list[str]) -> None:
        """
        C{reasons} is the single reason that the estimator finds the
        password too easy to guess.
        """
        self.assertEqual(len(reasons), 1, reasons)
        self.assertTrue(reasons[0].startswith("it is too easy to guess"), reasons)

    def test_strongPassphrase(self) -> None:
        """
        A passphrase of a few uncommon words passes, and so do random
        characters of the minimum length.
        """
        self.assertEqual(checkPassword(STRONG, "alice"), [])
        self.assertEqual(
            checkPassword(STRONG, "alice@example.org", ["example.org"]), []
        )
        self.assertEqual(checkPassword("xK9#mq2!vLp0", "alice"), [])
        self.assertEqual(len("xK9#mq2!vLp0"), MIN_LENGTH)

    def test_tooShort(self) -> None:
        """
        A password of fewer than L{MIN_LENGTH} (12) characters is refused
        for that alone, however random.
        """
        self.assertEqual(MIN_LENGTH, 12)
        self.assertEqual(
            checkPassword("xK9#mq2!vLp", "alice"),
            ["it is shorter than 12 characters"],
        )

    def test_lengthInCharacters(self) -> None:
        """
        The length counts characters, not bytes.
        """
        password = "\u00e9\u00df\u00f8\u00e5\u00f1\u00fc\u00e7\u00ee\u00e6\u00f0\u00fe"
        self.assertIn(
            "it is shorter than 12 characters", checkPassword(password, "alice")
        )

    def test_userName(self) -> None:
        """
        A password containing the user name, in any case, is refused even if
        the estimator likes it.
        """
        for password in [
            "kumquat-alice-quarry",
            "kumquat-ALICE-quarry",
            "AlIcE" + STRONG,
        ]:
            self.assertEqual(
                checkPassword(password, "alice"), ["it contains the user name"]
            )

    def test_userNameBackwards(self) -> None:
        """
        A password containing the user name backwards is refused.
        """
        self.assertEqual(
            checkPassword("Ecila-kumquat-77", "alice"),
            ["it contains the user name backwards"],
        )

    def test_addressLocalPart(self) -> None:
        """
        For a user name that is an address, the local part counts as the
        user name too.
        """
        self.assertEqual(
            checkPassword("kumquat-alice-quarry", "alice@zanzibarov.net"),
            ["it contains the user name"],
        )
        self.assertEqual(
            checkPassword("kumquat-ecila-quarry", "alice@zanzibarov.net"),
            ["it contains the user name backwards"],
        )

    def test_shortUserName(self) -> None:
        """
        A user name of fewer than three characters is not looked for: it
        would be in too many good passwords.
        """
        self.assertEqual(checkPassword("walrus quartz lantern", "al"), [])

    def test_domainLabel(self) -> None:
        """
        A password containing a label of the user's domain, in any case,
        forwards or backwards, is refused with the label and domain named.
        """
        for password in [
            "kumquat example quarry",
            "KUMQUAT EXAMPLE quarry",
            "quarry elpmaxe kumquat",
        ]:
            self.assertEqual(
                checkPassword(password, "bob", ["example.org"]),
                ['it contains "example", from the domain example.org'],
            )

    def test_severalDomains(self) -> None:
        """
        Every domain given is looked at.
        """
        self.assertEqual(
            checkPassword(
                "kumquat zanzibarov quarry", "bob", ["example.org", "zanzibarov.net"]
            ),
            ['it contains "zanzibarov", from the domain zanzibarov.net'],
        )

    def test_topLevelDomain(self) -> None:
        """
        The top-level label of a domain is not refused: it says nothing
        about the user.
        """
        self.assertEqual(
            checkPassword("vivid org lantern quartz", "bob", ["example.org"]), []
        )

    def test_noDomains(self) -> None:
        """
        Without domains, a domain-like word in the password is no reason.
        """
        self.assertEqual(checkPassword("kumquat example quarry", "bob"), [])

    def test_guessable(self) -> None:
        """
        A password zxcvbn scores below L{MIN_SCORE} is refused; the reason
        gives the score and zxcvbn's warning and suggestions.
        """
        self.assertEqual(MIN_SCORE, 3)
        reasons = checkPassword("Password1234", "bob")
        self.assertGuessable(reasons)
        self.assertEqual(
            reasons[0],
            "it is too easy to guess (strength 1 of 4, 3 needed):"
            " This is similar to a commonly used password."
            " Add another word or two. Uncommon words are better."
            " Capitalization doesn't help very much.",
        )

    def test_allReasons(self) -> None:
        """
        Every reason that applies is given, in the order length, user name,
        domain, estimate.
        """
        reasons = checkPassword("bobexample", "bob", ["example.org"])
        self.assertEqual(
            reasons[:3],
            [
                "it is shorter than 12 characters",
                "it contains the user name",
                'it contains "example", from the domain example.org',
            ],
        )
        self.assertEqual(len(reasons), 4)
        self.assertTrue(reasons[3].startswith("it is too easy to guess"))

    def test_commonPassword(self) -> None:
        """
        One of the most common passwords gets zxcvbn's warning.
        """
        reasons = checkPassword("password", "bob")
        self.assertEqual(reasons[0], "it is shorter than 12 characters")
        self.assertIn("(strength 0 of 4, 3 needed)", reasons[1])
        self.assertIn("This is a top-10 common password.", reasons[1])

    def test_userNameKnownToEstimator(self) -> None:
        """
        The estimator is told the user name, so a disguised form of it (which
        the substring rule misses) counts against the password.
        """
        self.assertEqual(checkPassword(LEET, "alice"), [])
        self.assertGuessable(checkPassword(LEET, "zanzibarov"))

    def test_domainKnownToEstimator(self) -> None:
        """
        The estimator is told the domain labels too.
        """
        self.assertEqual(checkPassword(LEET, "alice", ["example.org"]), [])
        self.assertGuessable(checkPassword(LEET, "alice", ["zanzibarov.org"]))

    def test_empty(self) -> None:
        """
        The empty password is too short and has strength 0 (zxcvbn itself
        fails on it).
        """
        self.assertEqual(
            checkPassword("", "alice"),
            [
                "it is shorter than 12 characters",
                "it is too easy to guess (strength 0 of 4, 3 needed)",
            ],
        )

    def test_longPassword(self) -> None:
        """
        Passwords far longer than zxcvbn accepts are checked without error:
        a long random one passes, a long repetitive one does not.
        """
        self.assertEqual(checkPassword(randomLooking(1000), "alice"), [])
        self.assertGuessable(checkPassword("a" * 1000, "bob"))

    def test_longPasswordWholeChecked(self) -> None:
        """
        The user name and domain rules look at the whole of a long password,
        not only what the estimator sees.
        """
        password = randomLooking(500) + "alice" + "example"
        self.assertEqual(
            checkPassword(password, "alice", ["example.org"]),
            [
                "it contains the user name",
                'it contains "example", from the domain example.org',
            ],
        )

    def test_neverQuotesPassword(self) -> None:
        """
        No reason quotes the password.
        """
        for password in ["qwerty", "Password1234", "bobexample", "a" * 200]:
            for reason in checkPassword(password, "bob", ["example.org"]):
                self.assertNotIn(password, reason)


class DomainLabelsTests(SynchronousTestCase):
    """
    Tests for L{domainLabels}.
    """

    def test_simple(self) -> None:
        """
        The top-level label is left out.
        """
        self.assertEqual(domainLabels("example.org"), ["example"])
        self.assertEqual(domainLabels("Example.ORG."), ["example"])

    def test_generic(self) -> None:
        """
        Generic labels and labels of fewer than three characters are left
        out; the others are kept in order.
        """
        self.assertEqual(domainLabels("relay.mail.example.co.uk"), ["relay", "example"])
        self.assertEqual(domainLabels("mx.example.com"), ["example"])

    def test_singleLabel(self) -> None:
        """
        A domain of one label is kept whole.
        """
        self.assertEqual(domainLabels("localhost"), ["localhost"])

    def test_idna(self) -> None:
        """
        An IDNA label is given both as it is and in Unicode.
        """
        self.assertEqual(
            domainLabels("xn--bcher-kva.example"), ["xn--bcher-kva", "b\u00fccher"]
        )
        self.assertEqual(domainLabels("xn--zz.example"), ["xn--zz"])

    def test_empty(self) -> None:
        """
        An empty or dots-only domain has no labels.
        """
        self.assertEqual(domainLabels(""), [])
        self.assertEqual(domainLabels(".."), [])


class CommonPasswordsTests(SynchronousTestCase):
    """
    Tests for L{commonPasswords}.
    """

    def test_ranked(self) -> None:
        """
        The passwords come most common first, as many as asked for.
        """
        self.assertEqual(commonPasswords(2), ["123456", "password"])
        self.assertEqual(len(commonPasswords(1000)), 1000)
        self.assertEqual(len(set(commonPasswords(1000))), 1000)

    def test_fewerIfShort(self) -> None:
        """
        Asking for more than the list holds gives the whole list.
        """
        everything = commonPasswords(10**9)
        self.assertGreater(len(everything), 10000)
        self.assertEqual(commonPasswords(len(everything) + 5), everything)
