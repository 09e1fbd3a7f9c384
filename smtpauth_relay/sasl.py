"""
The SASL mechanisms offered by C{AUTH} (RFC 4954): PLAIN (RFC 4616) and LOGIN.

Each mechanism is a small state machine fed the decoded client responses; it
answers with the next challenge or, when done, the credentials to check.
Base64 and the SMTP reply codes are the server protocol's business.
"""

from __future__ import annotations

from twisted.cred.credentials import UsernamePassword


class MechanismError(ValueError):
    """
    The client's response is malformed for this mechanism (501 5.5.2).
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


MECHANISMS: dict[str, type[Plain] | type[Login]] = {"PLAIN": Plain, "LOGIN": Login}
