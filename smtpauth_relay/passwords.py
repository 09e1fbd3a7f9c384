# -*- test-case-name: tests.test_passwords -*-
"""
Password hashes: verifying the schemes found in password files, and making new
ones.

Five schemes are understood, told apart by their prefix:

  - C{bcrypt}: C{$2a$}, C{$2b$} and C{$2y$} (what C{htpasswd -B} writes);
  - C{argon2id}: C{$argon2id$} (PHC string format, as argon2-cffi writes);
  - C{sha512-crypt}: C{$6$}, with an optional C{rounds=N$} (glibc crypt(3),
    C{openssl passwd -6}, C{mkpasswd -m sha-512}, Dovecot C{SHA512-CRYPT});
  - C{scram-sha-256}: the SCRAM-SHA-256 (RFC 5802, RFC 7677) StoredKey and
    ServerKey, as PostgreSQL writes them
    (C{SCRAM-SHA-256$ITERATIONS:SALT$STOREDKEY:SERVERKEY}, base64) or as
    Dovecot does (C{{SCRAM-SHA-256}ITERATIONS,SALT,STOREDKEY,SERVERKEY});
    the only scheme with which a client can log in with the SCRAM-SHA-256
    mechanism;
  - C{cram-md5}: Dovecot's C{{CRAM-MD5}} (the HMAC-MD5 outer and inner MD5
    states of the password, 64 hex digits); the only scheme with which a
    client can log in with CRAM-MD5.  It is equivalent to the password for
    CRAM-MD5 and nearly as weak as unsalted MD5 otherwise: keep such files
    as secret as plaintext.

New hashes are bcrypt unless another scheme is asked for.

Every function here is blocking and CPU-bound (a bcrypt verification at cost 12
takes a quarter of a second): call them in a thread, never on the reactor
thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import stringprep
import struct
import threading
import unicodedata
from dataclasses import dataclass

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from smtpauth_relay.durable import replaceFile

__all__ = [
    "ARGON2ID",
    "BCRYPT",
    "CRAM_MD5",
    "DEFAULT_BCRYPT_ROUNDS",
    "DEFAULT_SCRAM_ITERATIONS",
    "SCRAM_SHA_256",
    "SHA512_CRYPT",
    "ScramSecrets",
    "cramMD5Digest",
    "cramMD5State",
    "dummyHash",
    "fakeScramSecrets",
    "saltKey",
    "useSaltKey",
    "hashPassword",
    "hashScheme",
    "parseCramMD5",
    "parseScram",
    "saslprep",
    "scramSecrets",
    "sha512Crypt",
    "verifyPassword",
]

BCRYPT = "bcrypt"
ARGON2ID = "argon2id"
SHA512_CRYPT = "sha512-crypt"
SCRAM_SHA_256 = "scram-sha-256"
CRAM_MD5 = "cram-md5"

NEW_HASH_SCHEMES = (BCRYPT, SCRAM_SHA_256, CRAM_MD5)
"""
The schemes L{hashPassword} writes.
"""

DEFAULT_SCRAM_ITERATIONS = 10000
"""
The PBKDF2 iterations of new SCRAM-SHA-256 entries: above RFC 7677's minimum
of 4096, and still quick for the client, which computes them at every login.
"""

MIN_SCRAM_ITERATIONS = 4096
"""
RFC 7677 section 4: fewer iterations than this must not be used.
"""

MAX_SCRAM_ITERATIONS = 10_000_000
"""
Entries with more iterations than this are refused as garbled: the server
verifies PLAIN logins against them, and one should not take minutes.
"""

SCRAM_SALT_LENGTH = 16
"""
Bytes of salt of new SCRAM-SHA-256 entries (as PostgreSQL and Dovecot).
"""

DEFAULT_BCRYPT_ROUNDS = 12
"""
The bcrypt cost (log2 of the number of rounds) of new hashes.
"""

_BCRYPT_MAX_PASSWORD = 72
"""
bcrypt only ever looks at the first 72 bytes of a password.
"""

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_ARGON2ID_PREFIX = "$argon2id$"
_SHA512_PREFIX = "$6$"
_SCRAM_PREFIX = "SCRAM-SHA-256$"
_SCRAM_DOVECOT_PREFIX = "{SCRAM-SHA-256}"
_CRAM_MD5_PREFIX = "{CRAM-MD5}"

_SCRAM_HASH = re.compile(
    r"SCRAM-SHA-256\$(?P<iterations>[0-9]{1,9}):(?P<salt>[A-Za-z0-9+/=]+)"
    r"\$(?P<storedKey>[A-Za-z0-9+/=]+):(?P<serverKey>[A-Za-z0-9+/=]+)"
)
_SCRAM_DOVECOT_HASH = re.compile(
    r"\{SCRAM-SHA-256\}(?P<iterations>[0-9]{1,9}),(?P<salt>[A-Za-z0-9+/=]+)"
    r",(?P<storedKey>[A-Za-z0-9+/=]+),(?P<serverKey>[A-Za-z0-9+/=]+)"
)
_CRAM_MD5_HASH = re.compile(r"\{CRAM-MD5\}(?P<state>[0-9a-fA-F]{64})")

_SHA512_ROUNDS_DEFAULT = 5000
_SHA512_ROUNDS_MIN = 1000
_SHA512_ROUNDS_MAX = 999999999
_SHA512_SALT_MAX = 16

_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

_SHA512_HASH = re.compile(
    r"\$6\$(?:rounds=(?P<rounds>[0-9]{1,9})\$)?"
    r"(?P<salt>[^$:\n]{0,16})\$(?P<checksum>[./0-9A-Za-z]{86})"
)

# The order in which the bytes of the final SHA-512 digest are encoded: each
# triple becomes four characters, and byte 63 alone becomes the last two.
_SHA512_PERMUTATION = (
    (0, 21, 42),
    (22, 43, 1),
    (44, 2, 23),
    (3, 24, 45),
    (25, 46, 4),
    (47, 5, 26),
    (6, 27, 48),
    (28, 49, 7),
    (50, 8, 29),
    (9, 30, 51),
    (31, 52, 10),
    (53, 11, 32),
    (12, 33, 54),
    (34, 55, 13),
    (56, 14, 35),
    (15, 36, 57),
    (37, 58, 16),
    (59, 17, 38),
    (18, 39, 60),
    (40, 61, 19),
    (62, 20, 41),
)

_argon2Hasher = PasswordHasher()


def hashScheme(encoded: str) -> str | None:
    """
    Tell which scheme a hash claims to be, from its prefix alone.

    @param encoded: A hash as found in a password file.

    @return: L{BCRYPT}, L{ARGON2ID}, L{SHA512_CRYPT}, L{SCRAM_SHA_256},
        L{CRAM_MD5}, or C{None} for anything else.  A known prefix does not
        mean the rest of the hash is well formed.
    """
    if encoded.startswith(_BCRYPT_PREFIXES):
        return BCRYPT
    if encoded.startswith(_ARGON2ID_PREFIX):
        return ARGON2ID
    if encoded.startswith(_SHA512_PREFIX):
        return SHA512_CRYPT
    if encoded.startswith((_SCRAM_PREFIX, _SCRAM_DOVECOT_PREFIX)):
        return SCRAM_SHA_256
    if encoded.startswith(_CRAM_MD5_PREFIX):
        return CRAM_MD5
    return None


def verifyPassword(password: bytes, encoded: str) -> bool:
    """
    Check a password against a hash, in constant time with respect to the
    password.

    This is blocking and deliberately slow: call it in a thread.

    @param password: The password the client offered.
    @param encoded: The stored hash, in any scheme L{hashScheme} knows.

    @return: C{True} if the password matches; C{False} if it does not, and
        also if the hash is of an unknown scheme or garbled (this never raises
        for a bad hash).
    """
    if not encoded.isascii():
        return False
    scheme = hashScheme(encoded)
    if scheme == BCRYPT:
        return _verifyBcrypt(password, encoded)
    if scheme == ARGON2ID:
        return _verifyArgon2id(password, encoded)
    if scheme == SHA512_CRYPT:
        return _verifySha512Crypt(password, encoded)
    if scheme == SCRAM_SHA_256:
        return _verifyScram(password, encoded)
    if scheme == CRAM_MD5:
        return _verifyCramMD5(password, encoded)
    return False


def hashPassword(
    password: bytes,
    *,
    rounds: int = DEFAULT_BCRYPT_ROUNDS,
    scheme: str = BCRYPT,
    iterations: int = DEFAULT_SCRAM_ITERATIONS,
) -> str:
    """
    Hash a password for storage: with bcrypt (C{$2b$}) by default.

    This is blocking and deliberately slow.

    @param password: The password to hash.
    @param rounds: The bcrypt cost, 4 to 31; each step doubles the work.
    @param scheme: One of L{NEW_HASH_SCHEMES}: L{BCRYPT}; L{SCRAM_SHA_256}
        (PostgreSQL's layout, a random 16-byte salt, C{iterations}
        iterations, the password SASLprep'ed); or L{CRAM_MD5} (Dovecot's
        C{{CRAM-MD5}}).
    @param iterations: The PBKDF2 iterations of a SCRAM-SHA-256 entry.

    @return: The hash, e.g. C{$2b$12$...}.

    @raise ValueError: If C{password} is empty, longer than the 72 bytes
        bcrypt can use (rather than silently ignore the rest of it), not
        valid for SCRAM (not UTF-8, or refused by SASLprep), or if
        C{scheme} or C{iterations} is not valid.
    """
    if not password:
        raise ValueError("the password is empty")
    if scheme == SCRAM_SHA_256:
        return _hashScram(password, iterations)
    if scheme == CRAM_MD5:
        return _CRAM_MD5_PREFIX + cramMD5State(password).hex()
    if scheme != BCRYPT:
        raise ValueError(f"unknown password scheme {scheme!r}")
    if len(password) > _BCRYPT_MAX_PASSWORD:
        raise ValueError(
            f"the password is longer than the {_BCRYPT_MAX_PASSWORD} bytes"
            " bcrypt can use"
        )
    salt = bcrypt.gensalt(rounds, prefix=b"2b")
    return bcrypt.hashpw(password, salt).decode("ascii")


_dummyLock = threading.Lock()
_dummyHashes: dict[int, str] = {}


def dummyHash(rounds: int = DEFAULT_BCRYPT_ROUNDS) -> str:
    """
    A bcrypt hash of a random password nobody knows, to verify against when
    the user does not exist, so that an unknown user costs the same time as a
    wrong password.

    It is made on the first call (for each cost) and remembered; the first call
    is therefore as slow as L{hashPassword}.

    @param rounds: The bcrypt cost; it should be that of the real hashes.

    @return: A bcrypt hash.
    """
    with _dummyLock:
        encoded = _dummyHashes.get(rounds)
        if encoded is None:
            import secrets

            encoded = hashPassword(secrets.token_bytes(32), rounds=rounds)
            _dummyHashes[rounds] = encoded
        return encoded


def _verifyBcrypt(password: bytes, encoded: str) -> bool:
    """
    Verify a bcrypt hash.

    C{$2y$} (PHP's and Apache's name for the corrected algorithm) is the same as
    C{$2b$}.  Passwords are cut at 72 bytes as every bcrypt implementation
    does, so that hashes written by other tools for long passwords verify.
    """
    if encoded.startswith("$2y$"):
        encoded = "$2b$" + encoded[4:]
    expected = encoded.encode("ascii")
    try:
        actual = bcrypt.hashpw(password[:_BCRYPT_MAX_PASSWORD], expected)
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def _verifyArgon2id(password: bytes, encoded: str) -> bool:
    """
    Verify an argon2id hash (libargon2 compares in constant time).
    """
    try:
        return _argon2Hasher.verify(encoded, password)
    except (VerificationError, InvalidHashError):
        # VerifyMismatchError is a VerificationError.
        return False


def _verifySha512Crypt(password: bytes, encoded: str) -> bool:
    """
    Verify a sha512-crypt hash by recomputing it from its own setting.
    """
    match = _SHA512_HASH.fullmatch(encoded)
    if match is None:
        return False
    actual = sha512Crypt(password, encoded)
    return hmac.compare_digest(actual.encode("ascii"), encoded.encode("ascii"))


def sha512Crypt(password: bytes, setting: str) -> str:
    """
    Compute a sha512-crypt (C{$6$}) hash, following Ulrich Drepper's
    specification "Unix crypt using SHA-256 and SHA-512"
    (U{https://www.akkadia.org/drepper/SHA-crypt.txt}).

    As in the specification, a salt longer than 16 characters is cut to 16,
    a number of rounds outside 1000 to 999,999,999 is brought inside that
    range, and C{rounds=N$} appears in the result whenever it appeared in the
    setting.

    @param password: The password.
    @param setting: C{$6$SALT}, C{$6$rounds=N$SALT}, or a complete hash (whose
        checksum is ignored).

    @return: The complete hash, C{$6$[rounds=N$]SALT$CHECKSUM}.

    @raise ValueError: If C{setting} does not start with C{$6$} or has a
        non-numeric C{rounds=}.
    """
    if not setting.startswith(_SHA512_PREFIX):
        raise ValueError("not a sha512-crypt setting")
    rest = setting[len(_SHA512_PREFIX) :]
    rounds = _SHA512_ROUNDS_DEFAULT
    customRounds = False
    if rest.startswith("rounds="):
        number, sep, after = rest[len("rounds=") :].partition("$")
        if not sep or not number.isdigit() or not number.isascii():
            raise ValueError("malformed rounds= in sha512-crypt setting")
        rounds = min(max(int(number), _SHA512_ROUNDS_MIN), _SHA512_ROUNDS_MAX)
        customRounds = True
        rest = after
    saltText = rest.split("$", 1)[0][:_SHA512_SALT_MAX]
    salt = saltText.encode("utf-8")

    checksum = _sha512CryptDigest(password, salt, rounds)
    prefix = _SHA512_PREFIX
    if customRounds:
        prefix += f"rounds={rounds}$"
    return f"{prefix}{saltText}${_encodeSha512(checksum)}"


def _repeatToLength(digest: bytes, length: int) -> bytes:
    """
    Repeat C{digest} as often as needed and cut it to C{length} bytes (steps
    16 and 20 of the specification build the P and S sequences this way).
    """
    quotient, remainder = divmod(length, len(digest))
    return digest * quotient + digest[:remainder]


def _sha512CryptDigest(password: bytes, salt: bytes, rounds: int) -> bytes:
    """
    The 64-byte digest at the heart of sha512-crypt; the numbered comments
    are the steps of the specification's algorithm.
    """
    sha512 = hashlib.sha512
    length = len(password)

    # Steps 4-8: digest B is password, salt, password.
    digestB = sha512(password + salt + password).digest()

    # Steps 1-3: digest A starts with the password and the salt.
    contextA = sha512(password + salt)
    # Steps 9-10: add B for each full 64 bytes of password, then part of it.
    contextA.update(_repeatToLength(digestB, length))
    # Step 11: for each bit of the length, from the least significant, add B
    # for a one and the password for a zero.
    bits = length
    while bits > 0:
        contextA.update(digestB if bits & 1 else password)
        bits >>= 1
    # Step 12.
    digestA = contextA.digest()

    # Steps 13-16: digest DP is the password repeated once per byte of it.
    digestDP = sha512(password * length).digest()
    sequenceP = _repeatToLength(digestDP, length)

    # Steps 17-20: digest DS is the salt repeated 16 + A[0] times.
    digestDS = sha512(salt * (16 + digestA[0])).digest()
    sequenceS = _repeatToLength(digestDS, len(salt))

    # Step 21: the rounds, each mixing the previous digest with P and S in an
    # order set by the round number.
    digestC = digestA
    for i in range(rounds):
        context = sha512()
        if i & 1:
            context.update(sequenceP)
        else:
            context.update(digestC)
        if i % 3:
            context.update(sequenceS)
        if i % 7:
            context.update(sequenceP)
        if i & 1:
            context.update(digestC)
        else:
            context.update(sequenceP)
        digestC = context.digest()
    return digestC


def _encodeSha512(digest: bytes) -> str:
    """
    Step 22: encode the final digest with crypt's own base-64 alphabet and
    byte order.
    """
    out = []
    for first, second, third in _SHA512_PERMUTATION:
        value = (digest[first] << 16) | (digest[second] << 8) | digest[third]
        for _ in range(4):
            out.append(_CRYPT_ALPHABET[value & 0x3F])
            value >>= 6
    value = digest[63]
    for _ in range(2):
        out.append(_CRYPT_ALPHABET[value & 0x3F])
        value >>= 6
    return "".join(out)


# -- SASLprep (RFC 4013) ------------------------------------------------------


def saslprep(text: str, *, allowUnassigned: bool = False) -> str:
    """
    Prepare a user name or password with SASLprep (RFC 4013, the
    C{stringprep} profile SCRAM uses), with Python's own C{stringprep}
    tables (Unicode 3.2, as RFC 3454 requires).

    @param text: The string.
    @param allowUnassigned: Whether code points unassigned in Unicode 3.2
        are let through: yes for a "query" (what a client sends), no for a
        "stored string" (a password being set).

    @return: The prepared string.

    @raise ValueError: If C{text} holds a prohibited character (a control
        character, a private use or non-character code point, ...) or breaks
        the bidirectional rules (the message names the rule, never the
        text).
    """
    mapped = []
    for character in text:
        if stringprep.in_table_c12(character):
            mapped.append(" ")
        elif not stringprep.in_table_b1(character):
            mapped.append(character)
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", "".join(mapped))
    for character in prepared:
        if (
            stringprep.in_table_c12(character)
            or stringprep.in_table_c21_c22(character)
            or stringprep.in_table_c3(character)
            or stringprep.in_table_c4(character)
            or stringprep.in_table_c5(character)
            or stringprep.in_table_c6(character)
            or stringprep.in_table_c7(character)
            or stringprep.in_table_c8(character)
            or stringprep.in_table_c9(character)
        ):
            raise ValueError("SASLprep: prohibited character")
        if not allowUnassigned and stringprep.in_table_a1(character):
            raise ValueError("SASLprep: unassigned code point")
    if any(stringprep.in_table_d1(character) for character in prepared):
        if any(stringprep.in_table_d2(character) for character in prepared):
            raise ValueError("SASLprep: mixed right-to-left and left-to-right text")
        if not (
            stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])
        ):
            raise ValueError(
                "SASLprep: right-to-left text must start and end with"
                " a right-to-left character"
            )
    return prepared


# -- SCRAM-SHA-256 (RFC 5802, RFC 7677) ---------------------------------------


@dataclass(frozen=True)
class ScramSecrets:
    """
    What the server keeps of a password for SCRAM-SHA-256 (RFC 5802
    section 3): enough to check a client's proof and prove itself, not
    enough to log in as the user.

    @ivar iterations: The PBKDF2 iteration count.
    @ivar salt: The salt.
    @ivar storedKey: C{H(HMAC(SaltedPassword, "Client Key"))}.
    @ivar serverKey: C{HMAC(SaltedPassword, "Server Key")}.
    @ivar known: C{False} for made-up secrets of a user who has none (see
        L{fakeScramSecrets}).
    """

    iterations: int
    salt: bytes
    storedKey: bytes
    serverKey: bytes
    known: bool = True

    def format(self) -> str:
        """
        @return: The secrets as PostgreSQL stores them:
            C{SCRAM-SHA-256$ITERATIONS:SALT$STOREDKEY:SERVERKEY}.
        """

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode("ascii")

        return (
            f"{_SCRAM_PREFIX}{self.iterations}:{b64(self.salt)}"
            f"${b64(self.storedKey)}:{b64(self.serverKey)}"
        )


def _scramPassword(password: bytes) -> bytes:
    """
    The password as SCRAM hashes it: UTF-8, SASLprep'ed as a query.  A
    password that is not UTF-8 or that SASLprep refuses is used as it is,
    as PostgreSQL does, so that its entries verify.
    """
    try:
        return saslprep(password.decode("utf-8"), allowUnassigned=True).encode("utf-8")
    except ValueError:  # UnicodeDecodeError included
        return password


def scramSecrets(password: bytes, salt: bytes, iterations: int) -> ScramSecrets:
    """
    Derive the SCRAM-SHA-256 secrets of a password.

    Blocking: PBKDF2 with C{iterations} iterations.

    @param password: The password (UTF-8; SASLprep is applied here).
    @param salt: The salt.
    @param iterations: The iteration count.
    """
    salted = hashlib.pbkdf2_hmac("sha256", _scramPassword(password), salt, iterations)
    clientKey = hmac.digest(salted, b"Client Key", "sha256")
    return ScramSecrets(
        iterations=iterations,
        salt=salt,
        storedKey=hashlib.sha256(clientKey).digest(),
        serverKey=hmac.digest(salted, b"Server Key", "sha256"),
    )


def _hashScram(password: bytes, iterations: int) -> str:
    """
    A new SCRAM-SHA-256 entry; see L{hashPassword}.
    """
    if not MIN_SCRAM_ITERATIONS <= iterations <= MAX_SCRAM_ITERATIONS:
        raise ValueError(
            f"SCRAM iterations must be between {MIN_SCRAM_ITERATIONS} and"
            f" {MAX_SCRAM_ITERATIONS}"
        )
    try:
        text = password.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the password is not UTF-8") from None
    try:
        prepared = saslprep(text)
    except ValueError:
        # The message would not quote the password, but keep it general.
        raise ValueError(
            "the password holds characters SCRAM cannot use (SASLprep refuses"
            " control, private-use and unassigned characters)"
        ) from None
    if not prepared:
        raise ValueError("the password is empty after SASLprep")
    return scramSecrets(
        password, secrets.token_bytes(SCRAM_SALT_LENGTH), iterations
    ).format()


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def parseScram(encoded: str) -> ScramSecrets | None:
    """
    Read a SCRAM-SHA-256 entry, in PostgreSQL's layout or Dovecot's.

    @return: The secrets, or C{None} if C{encoded} is not a well-formed
        SCRAM-SHA-256 entry (wrong layout, keys not 32 bytes, empty salt,
        iterations outside 1 to L{MAX_SCRAM_ITERATIONS}).
    """
    match = _SCRAM_HASH.fullmatch(encoded) or _SCRAM_DOVECOT_HASH.fullmatch(encoded)
    if match is None:
        return None
    iterations = int(match["iterations"])
    salt = _b64decode(match["salt"])
    storedKey = _b64decode(match["storedKey"])
    serverKey = _b64decode(match["serverKey"])
    if (
        not 1 <= iterations <= MAX_SCRAM_ITERATIONS
        or not salt
        or storedKey is None
        or serverKey is None
        or len(storedKey) != 32
        or len(serverKey) != 32
    ):
        return None
    return ScramSecrets(iterations, salt, storedKey, serverKey)


def _verifyScram(password: bytes, encoded: str) -> bool:
    """
    Verify a password against a SCRAM-SHA-256 entry: derive the StoredKey
    and compare it in constant time.
    """
    stored = parseScram(encoded)
    if stored is None:
        return False
    derived = scramSecrets(password, stored.salt, stored.iterations)
    return hmac.compare_digest(derived.storedKey, stored.storedKey)


_fakeSecretLock = threading.Lock()
_fakeSecret: list[bytes] = []


#: The name of the key file in the queue directory (L{saltKey}).
SALT_KEY_FILE = "scram-salt.key"


def _processSecret() -> bytes:
    """
    The key of L{fakeScramSecrets}: the one given to L{useSaltKey}, else
    a random one made once per process.
    """
    with _fakeSecretLock:
        if not _fakeSecret:
            _fakeSecret.append(secrets.token_bytes(32))
        return _fakeSecret[0]


def useSaltKey(key: bytes) -> None:
    """
    Make made-up SCRAM salts from C{key}: every process of a relay (its
    workers, C{[server] workers}) must use the same one, or an unknown user's
    salt would change from one connection to the next, telling that the
    user does not exist.
    """
    with _fakeSecretLock:
        _fakeSecret[:] = [key]


def saltKey(path: str, create: bool = True) -> bytes:
    """
    The relay's key for made-up SCRAM salts, kept in C{path} (created, 32
    random bytes readable by the relay alone, if missing), so that an
    unknown user's salt is the same in every process and after a restart,
    as a real user's is.  Blocking; call at start.

    @param create: whether to create the key if it is missing or too short
        (the main process); a worker process only reads the main one's: a
        key of its own would differ from the other processes'.

    @raise OSError: if it cannot be read or created.
    @raise ValueError: if it is missing or too short and C{create} is false.
    """
    try:
        with open(path, "rb") as f:
            key = f.read()
    except FileNotFoundError:
        key = b""
    if len(key) < 32:
        if not create:
            raise ValueError(f"{path}: no SCRAM salt key (the main process makes it)")
        key = secrets.token_bytes(32)
        replaceFile(path, key, mode=0o600)
    return key


def fakeScramSecrets(username: str, iterations: int) -> ScramSecrets:
    """
    Made-up SCRAM secrets for a user who has none, so that the exchange
    looks the same as for a real user and fails only at the proof.

    The salt is an HMAC of the user name under a key made once per process:
    asking twice gives the same salt, as for a real user, and nothing tells
    it from a random one.  The keys are random: no proof matches them.

    @param username: The user name.
    @param iterations: The iteration count to claim (that of the real
        entries around, so that it does not stand out).

    @return: Secrets with C{known=False}.
    """
    salt = hmac.digest(
        _processSecret(), b"scram-salt\0" + username.encode("utf-8"), "sha256"
    )[:SCRAM_SALT_LENGTH]
    return ScramSecrets(
        iterations=iterations,
        salt=salt,
        storedKey=secrets.token_bytes(32),
        serverKey=secrets.token_bytes(32),
        known=False,
    )


# -- CRAM-MD5 (RFC 2195) with Dovecot's stored MD5 states --------------------

_MASK = 0xFFFFFFFF
_MD5_INITIAL = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MD5_SHIFTS = (
    (7, 12, 17, 22) * 4 + (5, 9, 14, 20) * 4 + (4, 11, 16, 23) * 4 + (6, 10, 15, 21) * 4
)
_MD5_CONSTANTS = (
    0xD76AA478, 0xE8C7B756, 0x242070DB, 0xC1BDCEEE, 0xF57C0FAF, 0x4787C62A,
    0xA8304613, 0xFD469501, 0x698098D8, 0x8B44F7AF, 0xFFFF5BB1, 0x895CD7BE,
    0x6B901122, 0xFD987193, 0xA679438E, 0x49B40821, 0xF61E2562, 0xC040B340,
    0x265E5A51, 0xE9B6C7AA, 0xD62F105D, 0x02441453, 0xD8A1E681, 0xE7D3FBC8,
    0x21E1CDE6, 0xC33707D6, 0xF4D50D87, 0x455A14ED, 0xA9E3E905, 0xFCEFA3F8,
    0x676F02D9, 0x8D2A4C8A, 0xFFFA3942, 0x8771F681, 0x6D9D6122, 0xFDE5380C,
    0xA4BEEA44, 0x4BDECFA9, 0xF6BB4B60, 0xBEBFBC70, 0x289B7EC6, 0xEAA127FA,
    0xD4EF3085, 0x04881D05, 0xD9D4D039, 0xE6DB99E5, 0x1FA27CF8, 0xC4AC5665,
    0xF4292244, 0x432AFF97, 0xAB9423A7, 0xFC93A039, 0x655B59C3, 0x8F0CCC92,
    0xFFEFF47D, 0x85845DD1, 0x6FA87E4F, 0xFE2CE6E0, 0xA3014314, 0x4E0811A1,
    0xF7537E82, 0xBD3AF235, 0x2AD7D2BB, 0xEB86D391,
)  # fmt: skip

_MD5State = tuple[int, int, int, int]


def _md5Compress(state: _MD5State, block: bytes) -> _MD5State:
    """
    The MD5 compression function (RFC 1321 section 3.4): one 64-byte block.

    hashlib cannot resume from a saved state, which CRAM-MD5 against a
    stored HMAC state needs; the messages are a challenge and a digest, a
    couple of blocks, so pure Python is quick enough.
    """
    words = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f = (b & c) | (~b & d)
            g = i
        elif i < 32:
            f = (d & b) | (~d & c)
            g = (5 * i + 1) % 16
        elif i < 48:
            f = b ^ c ^ d
            g = (3 * i + 5) % 16
        else:
            f = c ^ (b | (~d & _MASK))
            g = (7 * i) % 16
        f = (f + a + _MD5_CONSTANTS[i] + words[g]) & _MASK
        shift = _MD5_SHIFTS[i]
        a, d, c = d, c, b
        b = (b + ((f << shift) | (f >> (32 - shift)))) & _MASK
    return (
        (state[0] + a) & _MASK,
        (state[1] + b) & _MASK,
        (state[2] + c) & _MASK,
        (state[3] + d) & _MASK,
    )


def _md5Finish(state: _MD5State, data: bytes, done: int) -> bytes:
    """
    Finish an MD5 computation that has already taken C{done} bytes (a
    multiple of 64) and reached C{state}, with C{data} as the rest.

    @return: The 16-byte digest.
    """
    length = done + len(data)
    padded = data + b"\x80" + b"\0" * ((55 - len(data)) % 64)
    padded += struct.pack("<Q", (length * 8) & 0xFFFFFFFFFFFFFFFF)
    for offset in range(0, len(padded), 64):
        state = _md5Compress(state, padded[offset : offset + 64])
    return struct.pack("<4I", *state)


def cramMD5State(password: bytes) -> bytes:
    """
    The HMAC-MD5 key schedule of a password as Dovecot stores it for
    CRAM-MD5: the MD5 state after the outer pad block, then after the
    inner pad block, each as four little-endian 32-bit words.

    @param password: The password (the HMAC key: hashed first if over 64
        bytes, as HMAC does).

    @return: 32 bytes.
    """
    key = hashlib.md5(password).digest() if len(password) > 64 else password
    key = key.ljust(64, b"\0")
    inner = _md5Compress(_MD5_INITIAL, bytes(k ^ 0x36 for k in key))
    outer = _md5Compress(_MD5_INITIAL, bytes(k ^ 0x5C for k in key))
    return struct.pack("<4I", *outer) + struct.pack("<4I", *inner)


def cramMD5Digest(state: bytes, challenge: bytes) -> bytes:
    """
    HMAC-MD5 of C{challenge} keyed with the password whose
    L{cramMD5State} is C{state}: what a CRAM-MD5 client answers (before hex).

    @return: 16 bytes.
    """
    outer = _unpackState(state[:16])
    inner = _unpackState(state[16:32])
    return _md5Finish(outer, _md5Finish(inner, challenge, 64), 64)


def _unpackState(data: bytes) -> _MD5State:
    """
    Four little-endian 32-bit words.
    """
    a, b, c, d = struct.unpack("<4I", data)
    return (a, b, c, d)


def parseCramMD5(encoded: str) -> bytes | None:
    """
    Read a C{{CRAM-MD5}} entry.

    @return: The 32-byte state, or C{None} if C{encoded} is not one.
    """
    match = _CRAM_MD5_HASH.fullmatch(encoded)
    if match is None:
        return None
    return bytes.fromhex(match["state"])


def _verifyCramMD5(password: bytes, encoded: str) -> bool:
    """
    Verify a password against a C{{CRAM-MD5}} entry, in constant time.
    """
    stored = parseCramMD5(encoded)
    if stored is None:
        return False
    return hmac.compare_digest(cramMD5State(password), stored)
