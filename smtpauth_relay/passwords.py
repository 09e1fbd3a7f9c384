# -*- test-case-name: tests.test_passwords -*-
"""
Password hashes: verifying the schemes found in password files, and making new
ones.

Three schemes are understood, told apart by their prefix:

  - C{bcrypt}: C{$2a$}, C{$2b$} and C{$2y$} (what C{htpasswd -B} writes);
  - C{argon2id}: C{$argon2id$} (PHC string format, as argon2-cffi writes);
  - C{sha512-crypt}: C{$6$}, with an optional C{rounds=N$} (glibc crypt(3),
    C{openssl passwd -6}, C{mkpasswd -m sha-512}, Dovecot C{SHA512-CRYPT}).

New hashes are always bcrypt.

Every function here is blocking and CPU-bound (a bcrypt verification at cost 12
takes a quarter of a second): call them in a thread, never on the reactor
thread.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "ARGON2ID",
    "BCRYPT",
    "DEFAULT_BCRYPT_ROUNDS",
    "SHA512_CRYPT",
    "dummyHash",
    "hashPassword",
    "hashScheme",
    "sha512Crypt",
    "verifyPassword",
]

BCRYPT = "bcrypt"
ARGON2ID = "argon2id"
SHA512_CRYPT = "sha512-crypt"

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

    @return: L{BCRYPT}, L{ARGON2ID}, L{SHA512_CRYPT}, or C{None} for anything
        else.  A known prefix does not mean the rest of the hash is well formed.
    """
    if encoded.startswith(_BCRYPT_PREFIXES):
        return BCRYPT
    if encoded.startswith(_ARGON2ID_PREFIX):
        return ARGON2ID
    if encoded.startswith(_SHA512_PREFIX):
        return SHA512_CRYPT
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
    return False


def hashPassword(password: bytes, *, rounds: int = DEFAULT_BCRYPT_ROUNDS) -> str:
    """
    Hash a password for storage, with bcrypt (C{$2b$}).

    This is blocking and deliberately slow.

    @param password: The password to hash.
    @param rounds: The bcrypt cost, 4 to 31; each step doubles the work.

    @return: The hash, e.g. C{$2b$12$...}.

    @raise ValueError: If C{password} is empty or longer than the 72 bytes
        bcrypt can use (rather than silently ignore the rest of it).
    """
    if not password:
        raise ValueError("the password is empty")
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
