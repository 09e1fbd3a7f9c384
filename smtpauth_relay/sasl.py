"""
The SASL mechanisms offered by C{AUTH} (RFC 4954): PLAIN (RFC 4616), LOGIN,
SCRAM-SHA-256 (RFC 5802, RFC 7677) and CRAM-MD5 (RFC 2195).

Each mechanism is a small state machine fed the decoded client responses; it
answers with the next challenge or, when done, the credentials to check.  A
step may answer with a L{Deferred} of either (SCRAM looks the user's salt up
in the middle of the exchange).  A mechanism that has something to send once
the credentials checked (SCRAM's server signature) returns it from
C{finalChallenge}; the client answers it with an empty response.  Base64
and the SMTP reply codes are the server protocol's business.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import re
import secrets
from typing import Protocol, TypeAlias

from twisted.cred.credentials import (
    ICredentials,
    IUsernameHashedPassword,
    UsernamePassword,
)
from twisted.internet.defer import Deferred
from zope.interface import implementer

from smtpauth_relay.interfaces import (
    ICramMD5Credentials,
    IScramCredentials,
    IScramStore,
)
from smtpauth_relay.passwords import ScramSecrets, cramMD5Digest, saslprep


class MechanismError(ValueError):
    """
    The client's response is malformed for this mechanism (501 5.5.2).
    """


class ChannelBindingNotSupported(MechanismError):
    """
    A SCRAM client asked for channel binding (C{p=}), which only the
    C{-PLUS} mechanisms do and the relay does not offer.
    """


class AuthorizationRefused(ValueError):
    """
    The client asked to act as someone other than the user it authenticated
    as (an authorization identity in PLAIN); refused as a failed login.

    @ivar username: the user it authenticated as.
    """

    def __init__(self, message: str, username: str) -> None:
        super().__init__(message)
        self.username = username


Step: TypeAlias = "bytes | ICredentials"
"""
What a mechanism answers to a response: the next challenge, or the
credentials to check.
"""


class Mechanism(Protocol):
    """
    What the server protocol needs of a mechanism.
    """

    name: str

    def challenge(self) -> bytes:
        """
        The first challenge, when the client sent no initial response.
        """

    def respond(self, response: bytes) -> Step | Deferred[Step]:
        """
        Take the client's (decoded) response.

        @raise MechanismError: If it is malformed.
        @raise AuthorizationRefused: If it asks to act as someone else.
        """

    def finalChallenge(self) -> bytes | None:
        """
        After the credentials checked: data for one last 334 challenge
        (answered with an empty response) before 235, or C{None}.
        """


class Plain:
    """
    RFC 4616: one message C{authzid NUL authcid NUL passwd}.  An authzid other
    than empty or the authcid itself is refused, so nobody acts as someone
    else.
    """

    name = "PLAIN"

    def challenge(self) -> bytes:
        """
        The challenge when the client sent no initial response: empty.
        """
        return b""

    def respond(self, response: bytes) -> bytes | UsernamePassword:
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise MechanismError("PLAIN response must have three fields")
        authzid, authcid, password = parts
        if not authcid:
            raise MechanismError("empty user name")
        if authzid and authzid != authcid:
            raise AuthorizationRefused(
                "authorization identity differs", authcid.decode("utf-8", "replace")
            )
        return UsernamePassword(authcid, password)

    def finalChallenge(self) -> None:
        return None


class Login:
    """
    The LOGIN mechanism: the server asks C{Username:} then C{Password:}.
    """

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: bytes | None = None

    def challenge(self) -> bytes:
        return b"Username:"

    def respond(self, response: bytes) -> bytes | UsernamePassword:
        if self._username is None:
            if not response:
                raise MechanismError("empty user name")
            self._username = response
            return b"Password:"
        return UsernamePassword(self._username, response)

    def finalChallenge(self) -> None:
        return None


# -- SCRAM-SHA-256 -------------------------------------------------------------

_SCRAM_NONCE_BYTES = 24
_PRINTABLE = re.compile(rb"[\x21-\x2b\x2d-\x7e]+")
"""RFC 5802 C{printable}: visible ASCII except C{,}."""
_SASLNAME = re.compile(rb"(?:[^=,\x00]|=2C|=3D)+")


def _saslname(value: bytes) -> str:
    """
    Decode an RFC 5802 C{saslname} (C{,} and C{=} written C{=2C} and C{=3D})
    and SASLprep it.

    @raise MechanismError: If it is empty, badly escaped, not UTF-8, or
        refused by SASLprep.
    """
    if not _SASLNAME.fullmatch(value):
        raise MechanismError("malformed SCRAM user name")
    try:
        text = value.replace(b"=2C", b",").replace(b"=3D", b"=").decode("utf-8")
        prepared = saslprep(text, allowUnassigned=True)
    except ValueError:  # UnicodeDecodeError included
        raise MechanismError("SCRAM user name refused by SASLprep") from None
    if not prepared:
        raise MechanismError("empty SCRAM user name")
    return prepared


def _attributes(message: bytes) -> list[tuple[bytes, bytes]]:
    """
    Split a SCRAM message into its C{name=value} attributes.

    @raise MechanismError: If one is not C{letter=value}.
    """
    result = []
    for part in message.split(b","):
        if len(part) < 2 or part[1:2] != b"=" or not part[:1].isalpha():
            raise MechanismError("malformed SCRAM attribute")
        result.append((part[:1], part[2:]))
    return result


@implementer(IScramCredentials)
class ScramCredentials:
    """
    A finished SCRAM-SHA-256 exchange; see L{IScramCredentials}.

    @ivar username: The user name (UTF-8, SASLprep'ed).
    @ivar authMessage: RFC 5802's C{AuthMessage}.
    @ivar clientProof: The proof the client sent.
    """

    def __init__(self, username: bytes, authMessage: bytes, clientProof: bytes):
        self.username = username
        self.authMessage = authMessage
        self.clientProof = clientProof

    def checkProof(self, storedKey: bytes) -> bool:
        """
        RFC 5802 section 3: recover C{ClientKey} from the proof with
        C{ClientSignature = HMAC(StoredKey, AuthMessage)}, and compare its
        hash with C{StoredKey}, in constant time.
        """
        signature = hmac.digest(storedKey, self.authMessage, "sha256")
        if len(self.clientProof) != len(signature):
            return False
        clientKey = bytes(
            p ^ s for p, s in zip(self.clientProof, signature, strict=True)
        )
        return hmac.compare_digest(hashlib.sha256(clientKey).digest(), storedKey)


class ScramSHA256:
    """
    The server side of SCRAM-SHA-256 (RFC 5802 with SHA-256, RFC 7677),
    without channel binding.

    The client's first message names the user; the mechanism asks C{store}
    for that user's salt and iteration count (made-up ones for an unknown
    user, so that the exchange looks the same and fails only at the proof)
    and answers with its own.  The client's final message carries the
    proof, which becomes L{ScramCredentials} for the checkers; once they
    accept it, L{finalChallenge} is the server signature (C{v=}).

    A C{p=} flag (the client wants channel binding) is refused with
    L{ChannelBindingNotSupported}; C{n} and C{y} are accepted, as only
    SCRAM-SHA-256, never -PLUS, is offered.  An authorization identity
    (C{a=}) must be empty or the user itself, as with PLAIN.

    @ivar username: The (SASLprep'ed) user name, once the client gave it.
    """

    name = "SCRAM-SHA-256"

    def __init__(self, store: IScramStore, nonce: bytes | None = None) -> None:
        """
        @param store: Where the user's secrets come from (the chain of
            checkers).
        @param nonce: The server's part of the nonce; random by default.
        """
        self._store = store
        self._serverNonce = (
            nonce
            if nonce is not None
            else base64.b64encode(secrets.token_bytes(_SCRAM_NONCE_BYTES))
        )
        self._state = "first"
        self._gs2Header = b""
        self._clientFirstBare = b""
        self._serverFirst = b""
        self._nonce = b""
        self._secrets: ScramSecrets | None = None
        self._authMessage = b""
        self.username = ""

    def challenge(self) -> bytes:
        """
        SCRAM is client-first: the challenge is empty.
        """
        return b""

    def respond(self, response: bytes) -> Step | Deferred[Step]:
        if self._state == "first":
            return self._clientFirst(response)
        if self._state == "final":
            return self._clientFinal(response)
        raise MechanismError("SCRAM exchange already finished")

    def _clientFirst(self, message: bytes) -> Deferred[Step]:
        """
        C{gs2-header client-first-message-bare}: look the user up.
        """
        flag, sep, rest = message.partition(b",")
        if not sep:
            raise MechanismError("malformed SCRAM client-first-message")
        if flag.startswith(b"p="):
            raise ChannelBindingNotSupported("channel binding is not supported")
        if flag not in (b"n", b"y"):
            raise MechanismError("bad SCRAM channel binding flag")
        authzid, sep, bare = rest.partition(b",")
        if not sep:
            raise MechanismError("malformed SCRAM client-first-message")
        attributes = _attributes(bare)
        if len(attributes) < 2 or attributes[0][0] != b"n" or attributes[1][0] != b"r":
            raise MechanismError("malformed SCRAM client-first-message")
        if any(name == b"m" for name, value in attributes):
            raise MechanismError("unsupported SCRAM mandatory extension")
        username = _saslname(attributes[0][1])
        clientNonce = attributes[1][1]
        if not _PRINTABLE.fullmatch(clientNonce):
            raise MechanismError("malformed SCRAM nonce")
        if authzid:
            if not authzid.startswith(b"a=") or _saslname(authzid[2:]) != username:
                raise AuthorizationRefused("authorization identity differs", username)
        self.username = username
        self._gs2Header = flag + b"," + authzid + b","
        self._clientFirstBare = bare
        self._nonce = clientNonce + self._serverNonce
        self._state = "lookup"
        return self._store.scramSecrets(username).addCallback(self._serverFirstMessage)

    def _serverFirstMessage(self, found: ScramSecrets) -> bytes:
        self._secrets = found
        self._serverFirst = b"r=%s,s=%s,i=%d" % (
            self._nonce,
            base64.b64encode(found.salt),
            found.iterations,
        )
        self._state = "final"
        return self._serverFirst

    def _clientFinal(self, message: bytes) -> ScramCredentials:
        """
        C{c=... ,r=... [,extensions] ,p=...}: the credentials to check.
        """
        withoutProof, sep, proof = message.rpartition(b",p=")
        if not sep:
            raise MechanismError("SCRAM client-final-message without proof")
        attributes = _attributes(withoutProof)
        if len(attributes) < 2 or attributes[0][0] != b"c" or attributes[1][0] != b"r":
            raise MechanismError("malformed SCRAM client-final-message")
        try:
            binding = base64.b64decode(attributes[0][1], validate=True)
            clientProof = base64.b64decode(proof, validate=True)
        except (binascii.Error, ValueError):
            raise MechanismError("bad base64 in SCRAM client-final-message") from None
        if binding != self._gs2Header:
            raise MechanismError("SCRAM channel binding data does not match")
        if not hmac.compare_digest(attributes[1][1], self._nonce):
            raise MechanismError("SCRAM nonce does not match")
        self._authMessage = b",".join(
            [self._clientFirstBare, self._serverFirst, withoutProof]
        )
        self._state = "done"
        return ScramCredentials(
            self.username.encode("utf-8"), self._authMessage, clientProof
        )

    def finalChallenge(self) -> bytes:
        """
        C{server-final-message}: C{v=ServerSignature}, proving the server
        knows the user's ServerKey.
        """
        assert self._secrets is not None and self._state == "done"
        signature = hmac.digest(self._secrets.serverKey, self._authMessage, "sha256")
        return b"v=" + base64.b64encode(signature)


# -- CRAM-MD5 -------------------------------------------------------------------

_counter = itertools.count()


@implementer(IUsernameHashedPassword, ICramMD5Credentials)
class CramMD5Credentials:
    """
    A CRAM-MD5 response: the user name and the HMAC-MD5 of the challenge.

    A checker that keeps the password checks it with L{checkPassword}
    (Twisted's L{IUsernameHashedPassword}); one that keeps Dovecot's
    C{{CRAM-MD5}} state, with L{checkCramState}.  Both compare in constant
    time.
    """

    def __init__(self, username: bytes, challenge: bytes, digest: bytes) -> None:
        self.username = username
        self.challenge = challenge
        self.digest = digest

    def checkPassword(self, password: bytes | str) -> bool:
        if isinstance(password, str):
            password = password.encode("utf-8")
        expected = hmac.digest(password, self.challenge, "md5")
        return hmac.compare_digest(expected, self.digest)

    def checkCramState(self, state: bytes) -> bool:
        if len(state) != 32:
            return False
        return hmac.compare_digest(cramMD5Digest(state, self.challenge), self.digest)


class CramMD5:
    """
    CRAM-MD5 (RFC 2195): the server sends C{<random.timestamp@hostname>},
    the client answers C{user SP hex(HMAC-MD5(password, challenge))}.
    """

    name = "CRAM-MD5"

    def __init__(self, hostname: str, now: float) -> None:
        """
        @param hostname: The server's name, in the challenge.
        @param now: The time, in the challenge.
        """
        self._challenge = b"<%d.%d.%d@%s>" % (
            secrets.randbits(63),
            next(_counter),
            int(now),
            hostname.encode("idna"),
        )

    def challenge(self) -> bytes:
        return self._challenge

    def respond(self, response: bytes) -> CramMD5Credentials:
        username, sep, digest = response.rpartition(b" ")
        if not sep or not username:
            raise MechanismError("CRAM-MD5 response must be user and digest")
        if not re.fullmatch(rb"[0-9a-fA-F]{32}", digest):
            raise MechanismError("CRAM-MD5 digest must be 32 hex digits")
        return CramMD5Credentials(
            username, self._challenge, bytes.fromhex(digest.decode())
        )

    def finalChallenge(self) -> None:
        return None


MECHANISMS: dict[str, type[Plain] | type[Login] | type[ScramSHA256] | type[CramMD5]] = {
    "PLAIN": Plain,
    "LOGIN": Login,
    "SCRAM-SHA-256": ScramSHA256,
    "CRAM-MD5": CramMD5,
}
"""
Every mechanism the relay implements, by name.
"""

CLIENT_FIRST = frozenset({"PLAIN", "LOGIN", "SCRAM-SHA-256"})
"""
The mechanisms that take an initial response with C{AUTH}; CRAM-MD5 must
send its challenge first.
"""


def makeMechanism(
    name: str, store: IScramStore, hostname: str, now: float
) -> Mechanism:
    """
    Start an exchange of the mechanism called C{name}.

    @param store: Where SCRAM finds the users' secrets.
    @param hostname: The server's name (CRAM-MD5's challenge).
    @param now: The time (CRAM-MD5's challenge).

    @raise KeyError: If there is no such mechanism.
    """
    if name == "SCRAM-SHA-256":
        return ScramSHA256(store)
    if name == "CRAM-MD5":
        return CramMD5(hostname, now)
    if name == "PLAIN":
        return Plain()
    if name == "LOGIN":
        return Login()
    raise KeyError(name)
