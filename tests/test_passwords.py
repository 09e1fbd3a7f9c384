"""
Tests for L{smtpauth_relay.passwords}.
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets

from argon2 import PasswordHasher
from scramp import ScramMechanism
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay import passwords
from smtpauth_relay.passwords import (
    ARGON2ID,
    BCRYPT,
    CRAM_MD5,
    SCRAM_SHA_256,
    SHA512_CRYPT,
    cramMD5Digest,
    cramMD5State,
    dummyHash,
    fakeScramSecrets,
    hashPassword,
    hashScheme,
    parseCramMD5,
    parseScram,
    saltKey,
    saslprep,
    scramSecrets,
    sha512Crypt,
    useSaltKey,
    verifyPassword,
)

# Made with the bcrypt package: bcrypt.hashpw(b"secret", bcrypt.gensalt(4, b"2a")).
BCRYPT_2A_SECRET = "$2a$04$aGD1g8nLwZ0VVUwjhXtKq.cMV0lnl9dR54hSRBgtF2Yh.cWMrAY/y"

# Made with argon2-cffi:
# PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("secret").
ARGON2ID_SECRET = (
    "$argon2id$v=19$m=8,t=1,p=1$C5Xsp6qxbwXhEc5cR9n74w"
    "$3rAnmPZGr27Cg210qG+QbUn+Oll/fxYEqJkBE29ZpGc"
)

# The SHA-512 test vectors of Ulrich Drepper's specification "Unix crypt
# using SHA-256 and SHA-512" (https://www.akkadia.org/drepper/SHA-crypt.txt):
# (setting, password, result).
DREPPER_VECTORS = [
    (
        "$6$saltstring",
        b"Hello world!",
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJu"
        "esI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
    ),
    (
        "$6$rounds=10000$saltstringsaltstring",
        b"Hello world!",
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sb"
        "HbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (
        "$6$rounds=5000$toolongsaltstring",
        b"This is just a test",
        "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQ"
        "zQ3glMhwllF7oGDZxUhx1yxdYcz/e1JSbq3y6JMxxl8audkUEm0",
    ),
    (
        "$6$rounds=1400$anotherlongsaltstring",
        b"a very much longer text to encrypt.  This one even stretches over more"
        b"than one line.",
        "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wP"
        "vMxQ6Fm7I6IoYN3CmLs66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1",
    ),
    (
        "$6$rounds=77777$short",
        b"we have a short salt string but not a short password",
        "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0g"
        "ge1a1x3yRULJ5CCaUeOxFmtlcGZelFl5CxtgfiAc0",
    ),
    (
        "$6$rounds=123456$asaltof16chars..",
        b"a short string",
        "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwc"
        "elCjmw2kSYu.Ec6ycULevoBK25fs2xXgMNrCzIMVcgEJAstJeonj1",
    ),
    (
        "$6$rounds=10$roundstoolow",
        b"the minimum number is still observed",
        "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1x"
        "hLsPuWGsUSklZt58jaTfF4ZEQpyUNGc0dqbpBYYBaHHrsX.",
    ),
]

# Made on the development machine with OpenSSL 3.0's "openssl passwd -6":
# (password, hash).
OPENSSL_HASHES = [
    # openssl passwd -6 -salt saltsalt secret
    (
        b"secret",
        "$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8w"
        "iOQSpT0Y77vwPZN.Pq.H91p5hVO1",
    ),
    # openssl passwd -6 -salt abcdefghijklmnop 'correct horse battery staple'
    (
        b"correct horse battery staple",
        "$6$abcdefghijklmnop$UY4jc6.rVibJ9tqDqiG0GMdZRHkv1j4sPRRH2eUSo3Kszltzbk30"
        "CmYcWPNRTD/KsYFHF7WTtNkAxF3dZ3zPE.",
    ),
    # printf 'pässwörd' | openssl passwd -6 -salt Umlaut -stdin  (UTF-8)
    (
        "pässwörd".encode(),
        "$6$Umlaut$mJpgDTIpyNzU6ST/.Ehnp.TK6THjMx8szN0FtNZUTe.Bc7nRy.XdPOYkO9w30L"
        "r0DTj./VXWpQsXm6tYtlFGQ1",
    ),
    # openssl passwd -6 -salt 'rounds=2000$SALT' hunter2
    (
        b"hunter2",
        "$6$rounds=2000$SALT$xMw6EV81FtvnFGSFh.SIl.wq3.XrCLWVRHmJri.Qx.vV5l/T8avv"
        "xM2MO0l.74Zr6qDGfnwD/8vtd8FdEd/9p0",
    ),
    # openssl passwd -6 -salt 'A./0' "$(printf 'a%.0s' {1..100})"
    (
        b"a" * 100,
        "$6$A./0$OCK8tq2X.TaUruedm9zSm/XKGsqHQI.VzidnPIeTk9PY.eQ5yUm3R4tcP4JEqYwi6"
        "gIRthZ5.jpv2pC/l8NQF.",
    ),
]


class HashSchemeTests(SynchronousTestCase):
    """
    Tests for L{hashScheme}.
    """

    def test_known(self) -> None:
        """
        Each supported prefix names its scheme.
        """
        self.assertEqual(hashScheme(BCRYPT_2A_SECRET), BCRYPT)
        self.assertEqual(hashScheme("$2b$12$x"), BCRYPT)
        self.assertEqual(hashScheme("$2y$12$x"), BCRYPT)
        self.assertEqual(hashScheme(ARGON2ID_SECRET), ARGON2ID)
        self.assertEqual(hashScheme(OPENSSL_HASHES[0][1]), SHA512_CRYPT)

    def test_unknown(self) -> None:
        """
        Other schemes, plain text and nonsense are C{None}.
        """
        for encoded in [
            "",
            "secret",
            "$1$salt$hash",
            "$5$salt$hash",
            "$2x$04$abc",
            "$argon2i$v=19$m=8,t=1,p=1$abc$def",
            "{SSHA}abc",
            "$apr1$salt$hash",
        ]:
            self.assertIsNone(hashScheme(encoded), encoded)


class VerifyPasswordTests(SynchronousTestCase):
    """
    Tests for L{verifyPassword}.
    """

    def test_bcrypt2a(self) -> None:
        """
        A C{$2a$} hash verifies its password and no other.
        """
        self.assertTrue(verifyPassword(b"secret", BCRYPT_2A_SECRET))
        self.assertFalse(verifyPassword(b"Secret", BCRYPT_2A_SECRET))
        self.assertFalse(verifyPassword(b"", BCRYPT_2A_SECRET))

    def test_bcrypt2b(self) -> None:
        """
        A C{$2b$} hash verifies its password and no other.
        """
        encoded = hashPassword(b"secret", rounds=4)
        self.assertTrue(encoded.startswith("$2b$04$"))
        self.assertTrue(verifyPassword(b"secret", encoded))
        self.assertFalse(verifyPassword(b"secret2", encoded))

    def test_bcrypt2y(self) -> None:
        """
        A C{$2y$} hash (Apache's and PHP's name for C{$2b$}) verifies like the
        same hash spelt C{$2b$}.
        """
        encoded = "$2y$" + hashPassword(b"secret", rounds=4)[4:]
        self.assertTrue(verifyPassword(b"secret", encoded))
        self.assertFalse(verifyPassword(b"wrong", encoded))

    def test_bcryptLongPassword(self) -> None:
        """
        As in every bcrypt implementation, only the first 72 bytes of a
        password count, so hashes other tools made of long passwords verify.
        """
        encoded = hashPassword(b"x" * 72, rounds=4)
        self.assertTrue(verifyPassword(b"x" * 72, encoded))
        self.assertTrue(verifyPassword(b"x" * 100, encoded))
        self.assertFalse(verifyPassword(b"x" * 71, encoded))

    def test_argon2id(self) -> None:
        """
        An argon2id hash verifies its password and no other.
        """
        self.assertTrue(verifyPassword(b"secret", ARGON2ID_SECRET))
        self.assertFalse(verifyPassword(b"secreT", ARGON2ID_SECRET))
        fresh = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(
            "p\u00e4ss"
        )
        self.assertTrue(verifyPassword("p\u00e4ss".encode(), fresh))
        self.assertFalse(verifyPassword(b"pass", fresh))

    def test_sha512CryptOpenSSL(self) -> None:
        """
        Hashes made by C{openssl passwd -6} verify their passwords and no
        others.
        """
        for password, encoded in OPENSSL_HASHES:
            self.assertTrue(verifyPassword(password, encoded), encoded)
            self.assertFalse(verifyPassword(password + b"x", encoded), encoded)
            self.assertFalse(verifyPassword(password[:-1], encoded), encoded)

    def test_sha512CryptVectors(self) -> None:
        """
        The results in the specification's test vectors verify their
        passwords and no others.
        """
        for _, password, encoded in DREPPER_VECTORS[:4]:
            self.assertTrue(verifyPassword(password, encoded), encoded)
            self.assertFalse(verifyPassword(password.upper(), encoded), encoded)

    def test_malformed(self) -> None:
        """
        Garbled hashes of every scheme, unknown schemes and non-ASCII text are
        C{False}, never an exception.
        """
        sha512 = OPENSSL_HASHES[0][1]
        for encoded in [
            "",
            "secret",
            "$",
            "$2b$",
            "$2b$04$",
            "$2b$04$short",
            "$2b$99$" + BCRYPT_2A_SECRET[7:],
            BCRYPT_2A_SECRET[:-1],
            BCRYPT_2A_SECRET + "x",
            "$2a$04$" + "\u00e9" * 53,
            "$argon2id$",
            "$argon2id$v=19$m=8,t=1,p=1$C5Xsp6qxbwXhEc5cR9n74w",
            ARGON2ID_SECRET[:-5],
            ARGON2ID_SECRET.replace("m=8", "m=x"),
            "$6$",
            "$6$salt",
            "$6$salt$",
            sha512[:-1],
            sha512 + "x",
            sha512.replace("$saltsalt$", "$saltsalt$$"),
            "$6$rounds=$salt$" + sha512[-86:],
            "$6$rounds=abc$salt$" + sha512[-86:],
            "$6$rounds=-5000$salt$" + sha512[-86:],
            "$6$saltsalt$" + "!" * 86,
            "$6$" + "\u00e9" * 8 + "$" + sha512[-86:],
            "$1$saltsalt$qjXMvbEw8oaL.CzflDugX/",
            "$5$saltsalt$abc",
            "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=",
        ]:
            self.assertFalse(verifyPassword(b"secret", encoded), encoded)

    def test_plaintextNeverMatches(self) -> None:
        """
        A password stored in clear text is not a hash: it never matches, even
        the same text.
        """
        self.assertFalse(verifyPassword(b"secret", "secret"))


class Sha512CryptTests(SynchronousTestCase):
    """
    Tests for L{sha512Crypt}, the implementation of Drepper's algorithm.
    """

    def test_specificationVectors(self) -> None:
        """
        Every SHA-512 test vector of the specification gives its result,
        including the long salt cut to 16 characters (C{rounds=5000}), a long
        password (C{rounds=1400}) and too few rounds raised to 1000
        (C{rounds=10}).
        """
        for setting, password, expected in DREPPER_VECTORS:
            self.assertEqual(sha512Crypt(password, setting), expected, setting)

    def test_openssl(self) -> None:
        """
        Recomputing a hash made by OpenSSL from its own setting gives it back.
        """
        for password, encoded in OPENSSL_HASHES:
            self.assertEqual(sha512Crypt(password, encoded), encoded)

    def test_tooManyRounds(self) -> None:
        """
        A stored hash claiming more rounds than the maximum of 999999999 is
        garbled (it cannot have been made by crypt): it does not verify, and
        nothing is computed.
        """
        self.assertFalse(verifyPassword(b"x", "$6$rounds=9999999999$salt$" + "a" * 86))

    def test_notSha512(self) -> None:
        """
        A setting of another scheme, or with a non-numeric rounds, is a
        L{ValueError}.
        """
        self.assertRaises(ValueError, sha512Crypt, b"x", "$5$salt")
        self.assertRaises(ValueError, sha512Crypt, b"x", "$6$rounds=x$salt")
        self.assertRaises(ValueError, sha512Crypt, b"x", "$6$rounds=1000")


class HashPasswordTests(SynchronousTestCase):
    """
    Tests for L{hashPassword}.
    """

    def test_bcrypt2b(self) -> None:
        """
        New hashes are bcrypt C{$2b$} at the given cost, salted afresh each
        time.
        """
        first = hashPassword(b"secret", rounds=4)
        second = hashPassword(b"secret", rounds=4)
        self.assertTrue(first.startswith("$2b$04$"))
        self.assertEqual(len(first), 60)
        self.assertNotEqual(first, second)
        self.assertEqual(hashScheme(first), BCRYPT)

    def test_defaultCost(self) -> None:
        """
        The default cost is 12.
        """
        self.assertEqual(passwords.DEFAULT_BCRYPT_ROUNDS, 12)
        self.assertTrue(dummyHash().startswith("$2b$12$"))

    def test_refused(self) -> None:
        """
        An empty password, and one longer than the 72 bytes bcrypt can use,
        are refused rather than silently cut.
        """
        self.assertRaises(ValueError, hashPassword, b"", rounds=4)
        self.assertRaises(ValueError, hashPassword, b"x" * 73, rounds=4)


class DummyHashTests(SynchronousTestCase):
    """
    Tests for L{dummyHash}.
    """

    def test_madeOnce(self) -> None:
        """
        The dummy hash is a bcrypt hash at the requested cost, made once and
        then always the same.
        """
        first = dummyHash(rounds=4)
        self.assertTrue(first.startswith("$2b$04$"))
        self.assertIs(dummyHash(rounds=4), first)

    def test_matchesNothingGuessable(self) -> None:
        """
        The dummy hash does not verify the empty password or common ones.
        """
        encoded = dummyHash(rounds=4)
        for password in [b"", b"password", b"secret", b"dummy"]:
            self.assertFalse(verifyPassword(password, encoded))


# RFC 7677 section 3: user "user", password "pencil".
RFC7677_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC7677_ITERATIONS = 4096

# doveadm pw -s SCRAM-SHA-256 -p pencil (Dovecot 2.3.19)
DOVECOT_SCRAM_PENCIL = (
    "{SCRAM-SHA-256}4096,KUpl1ByWA2dRKK93W2VyMw==,"
    "JIive3Cwv05TRP3PnMNJpYbLCOsmjRscimFzCbE1FDw=,"
    "7u0lDdKUhxZZgLxN3KtSVJX07YCNk/1CRjV918KkEoc="
)
# doveadm pw -s CRAM-MD5 -p pencil (Dovecot 2.3.19)
DOVECOT_CRAM_PENCIL = (
    "{CRAM-MD5}7f47ace0e2af8f6cdeb72c03243a8c87834e19104164d6a42de72d243adb4080"
)


class SASLprepTests(SynchronousTestCase):
    """
    Tests for L{saslprep} (RFC 4013).
    """

    def test_rfc4013Examples(self) -> None:
        """
        The examples of RFC 4013 section 3.
        """
        self.assertEqual(saslprep("I\u00adX"), "IX")
        self.assertEqual(saslprep("user"), "user")
        self.assertEqual(saslprep("USER"), "USER")
        self.assertEqual(saslprep("\u00aa"), "a")
        self.assertEqual(saslprep("\u2168"), "IX")
        self.assertRaises(ValueError, saslprep, "\u0007")
        self.assertRaises(ValueError, saslprep, "\u0627\u0031")

    def test_spaces(self) -> None:
        """
        Non-ASCII spaces become ASCII spaces.
        """
        self.assertEqual(saslprep("a\u00a0b\u3000c"), "a b c")

    def test_unassigned(self) -> None:
        """
        Code points unassigned in Unicode 3.2 are refused in stored strings
        and let through in queries.
        """
        unassigned = "\U0001f600"  # an emoji: unassigned in 3.2
        self.assertRaises(ValueError, saslprep, unassigned)
        self.assertEqual(saslprep(unassigned, allowUnassigned=True), unassigned)

    def test_rightToLeft(self) -> None:
        """
        Right-to-left text must start and end with a right-to-left
        character and hold no left-to-right one.
        """
        self.assertEqual(saslprep("\u0627\u0628"), "\u0627\u0628")
        self.assertRaises(ValueError, saslprep, "\u0627a\u0628")


class ScramSecretsTests(SynchronousTestCase):
    """
    Tests for the SCRAM-SHA-256 scheme.
    """

    def test_rfc7677(self) -> None:
        """
        The secrets of RFC 7677's example are those scramp (an independent
        implementation) derives.
        """
        found = scramSecrets(b"pencil", RFC7677_SALT, RFC7677_ITERATIONS)
        salt, storedKey, serverKey, iterations = ScramMechanism().make_auth_info(
            "pencil", iteration_count=RFC7677_ITERATIONS, salt=RFC7677_SALT
        )
        self.assertEqual(
            (found.salt, found.storedKey, found.serverKey, found.iterations),
            (salt, storedKey, serverKey, iterations),
        )

    def test_saslprepApplied(self) -> None:
        """
        The password is SASLprep'ed before hashing, as clients do.
        """
        self.assertEqual(
            scramSecrets("I\u00adX".encode(), b"salt", 4096),
            scramSecrets(b"IX", b"salt", 4096),
        )

    def test_hashAndVerify(self) -> None:
        """
        C{hashPassword(scheme="scram-sha-256")} writes PostgreSQL's layout
        with a fresh 16-byte salt, which verifies the password only.
        """
        encoded = hashPassword(b"pencil", scheme=SCRAM_SHA_256, iterations=4096)
        self.assertRegex(
            encoded, r"\ASCRAM-SHA-256\$4096:[A-Za-z0-9+/=]{24}\$[^:]{44}:[^:]{44}\Z"
        )
        self.assertEqual(hashScheme(encoded), SCRAM_SHA_256)
        self.assertTrue(verifyPassword(b"pencil", encoded))
        self.assertFalse(verifyPassword(b"pencil!", encoded))
        self.assertNotEqual(
            encoded, hashPassword(b"pencil", scheme=SCRAM_SHA_256, iterations=4096)
        )
        found = parseScram(encoded)
        assert found is not None
        self.assertEqual(found.format(), encoded)
        self.assertEqual(found.iterations, 4096)
        self.assertEqual(len(found.salt), 16)

    def test_defaultIterations(self) -> None:
        """
        New entries have 10,000 iterations by default; fewer than RFC
        7677's 4096 are refused.
        """
        self.assertEqual(passwords.DEFAULT_SCRAM_ITERATIONS, 10000)
        encoded = hashPassword(b"pencil", scheme=SCRAM_SHA_256)
        self.assertTrue(encoded.startswith("SCRAM-SHA-256$10000:"))
        self.assertRaises(
            ValueError, hashPassword, b"pencil", scheme=SCRAM_SHA_256, iterations=4095
        )

    def test_refusedPasswords(self) -> None:
        """
        A password SASLprep refuses (here a control character) or that is
        not UTF-8 cannot be stored for SCRAM.
        """
        for password in (b"pen\x07cil", b"\xff\xfe", "\u00ad".encode()):
            self.assertRaises(ValueError, hashPassword, password, scheme=SCRAM_SHA_256)

    def test_dovecotLayout(self) -> None:
        """
        Dovecot's C{{SCRAM-SHA-256}} entries are read and verify too.
        """
        self.assertEqual(hashScheme(DOVECOT_SCRAM_PENCIL), SCRAM_SHA_256)
        self.assertTrue(verifyPassword(b"pencil", DOVECOT_SCRAM_PENCIL))
        self.assertFalse(verifyPassword(b"pencil2", DOVECOT_SCRAM_PENCIL))

    def test_malformed(self) -> None:
        """
        Garbled entries are not parsed and verify nothing.
        """
        good = hashPassword(b"pencil", scheme=SCRAM_SHA_256, iterations=4096)
        head, _, keys = good.rpartition("$")
        stored, _, server = keys.partition(":")
        for bad in (
            "SCRAM-SHA-256$",
            good.replace("$4096:", "$0:"),
            good.replace("$4096:", "$99999999:"),
            f"{head}${stored[:-4]}:{server}",
            f"{head}$!{stored[1:]}:{server}",
            good + ":x",
        ):
            self.assertIsNone(parseScram(bad), bad)
            self.assertFalse(verifyPassword(b"pencil", bad))

    def test_fakeSecrets(self) -> None:
        """
        Made-up secrets have the same salt for the same user name within a
        process, another for another name, and the iterations asked for.
        """
        first = fakeScramSecrets("mallory", 4096)
        self.assertFalse(first.known)
        self.assertEqual(first.iterations, 4096)
        self.assertEqual(len(first.salt), 16)
        self.assertEqual(fakeScramSecrets("mallory", 4096).salt, first.salt)
        self.assertNotEqual(fakeScramSecrets("eve", 4096).salt, first.salt)

    def test_saltKeyShared(self) -> None:
        """
        The key of made-up salts is kept in a file (created with 32 random
        bytes, readable by its owner alone): every process that reads it,
        and the same relay after a restart, makes the same salt for an
        unknown user; another key makes another.
        """
        path = os.path.join(self.mktemp() + "-dir", "scram-salt.key")
        os.makedirs(os.path.dirname(path))
        key = saltKey(path)
        self.assertEqual(len(key), 32)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(saltKey(path), key)
        self.addCleanup(useSaltKey, secrets.token_bytes(32))
        useSaltKey(key)
        first = fakeScramSecrets("mallory", 4096).salt
        useSaltKey(saltKey(path))
        self.assertEqual(fakeScramSecrets("mallory", 4096).salt, first)
        useSaltKey(secrets.token_bytes(32))
        self.assertNotEqual(fakeScramSecrets("mallory", 4096).salt, first)

    def test_saltKeyTooShortReplaced(self) -> None:
        """
        A key file too short to be one (truncated) is replaced by a new key.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"short")
        key = saltKey(path)
        self.assertEqual(len(key), 32)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), key)

    def test_saltKeyReadOnly(self) -> None:
        """
        A worker process only reads the key: missing or too short, it is
        an error naming the file, and no key is written.
        """
        path = self.mktemp()
        with self.assertRaises(ValueError) as raised:
            saltKey(path, create=False)
        self.assertIn(path, str(raised.exception))
        self.assertFalse(os.path.exists(path))
        with open(path, "wb") as f:
            f.write(b"short")
        self.assertRaises(ValueError, saltKey, path, create=False)
        key = saltKey(path)
        self.assertEqual(saltKey(path, create=False), key)


class CramMD5SchemeTests(SynchronousTestCase):
    """
    Tests for the C{{CRAM-MD5}} scheme and the MD5 continued from a state.
    """

    def test_dovecot(self) -> None:
        """
        The state of a password is what C{doveadm pw -s CRAM-MD5} writes.
        """
        self.assertEqual(hashPassword(b"pencil", scheme=CRAM_MD5), DOVECOT_CRAM_PENCIL)
        self.assertEqual(hashScheme(DOVECOT_CRAM_PENCIL), CRAM_MD5)
        self.assertTrue(verifyPassword(b"pencil", DOVECOT_CRAM_PENCIL))
        self.assertFalse(verifyPassword(b"pencil ", DOVECOT_CRAM_PENCIL))
        upper = "{CRAM-MD5}" + DOVECOT_CRAM_PENCIL[len("{CRAM-MD5}") :].upper()
        self.assertTrue(verifyPassword(b"pencil", upper))

    def test_rfc2195(self) -> None:
        """
        The example of RFC 2195: the digest from the stored state is the
        one the RFC gives.
        """
        state = cramMD5State(b"tanstaaftanstaaf")
        digest = cramMD5Digest(state, b"<1896.697170952@postoffice.reston.mci.net>")
        self.assertEqual(digest.hex(), "b913a602c7eda7a495b4e6e7334d3890")

    def test_matchesHMAC(self) -> None:
        """
        For short, long (hashed first) and empty keys and messages of many
        lengths across block boundaries, the digest from the state is
        HMAC-MD5.
        """
        for key in (b"", b"k", b"k" * 64, b"k" * 65, bytes(range(200))):
            state = cramMD5State(key)
            for length in (0, 1, 55, 56, 63, 64, 65, 119, 120, 300):
                message = bytes(i % 251 for i in range(length))
                self.assertEqual(
                    cramMD5Digest(state, message),
                    hmac.digest(key, message, "md5"),
                    (key, length),
                )

    def test_malformed(self) -> None:
        """
        Anything but 64 hex digits after C{{CRAM-MD5}} is not parsed.
        """
        for bad in (
            "{CRAM-MD5}",
            DOVECOT_CRAM_PENCIL[:-1],
            DOVECOT_CRAM_PENCIL + "0",
            DOVECOT_CRAM_PENCIL[:-1] + "g",
        ):
            self.assertIsNone(parseCramMD5(bad))
            self.assertFalse(verifyPassword(b"pencil", bad))

    def test_unknownScheme(self) -> None:
        """
        C{hashPassword} refuses schemes it does not write.
        """
        self.assertRaises(ValueError, hashPassword, b"pencil", scheme="md5")
