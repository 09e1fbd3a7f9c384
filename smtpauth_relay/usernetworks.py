"""
Per-user login networks (C{[auth] allowed_networks}): a file of lines
C{user: 192.0.2.0/24, 2001:db8::/48}; a listed user may only log in from
those networks (a stolen password is useless from elsewhere).  Users not in
the file are not restricted.  C{#} starts a comment line.  The file is read
again when it changes; if it cannot be read, listed or not, nobody it could
restrict logs in (fail closed).
"""

from __future__ import annotations

import ipaddress

from twisted.logger import Logger

from smtpauth_relay.policy import IPNetwork, inNetworks
from smtpauth_relay.watchedfile import WatchedFile

log = Logger()


def parseUserNetworks(data: bytes, path: str) -> dict[str, tuple[IPNetwork, ...]]:
    """
    Parse the file; malformed lines are skipped with a warning.
    """
    result: dict[str, list[IPNetwork]] = {}
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, rest = line.partition(":")
        user = user.strip()
        try:
            if not sep or not user:
                raise ValueError("expected user: network, network")
            networks = [
                ipaddress.ip_network(item.strip(), strict=True)
                for item in rest.split(",")
                if item.strip()
            ]
            if not networks:
                raise ValueError("no networks listed")
        except ValueError as e:
            log.warn(
                "{path}:{lineNumber}: skipped: {problem}",
                path=path,
                lineNumber=number,
                problem=str(e),
            )
            continue
        result.setdefault(user, []).extend(networks)
    return {user: tuple(networks) for user, networks in result.items()}


class UserNetworks:
    """
    Which networks each user may log in from; see the module docstring.
    """

    def __init__(self, path: str) -> None:
        """
        @raise OSError: if the file cannot be read now.
        """
        self.file = WatchedFile(path, parseUserNetworks, "allowed networks file")
        self.file.current()

    def mayLogIn(self, user: str, host: str) -> bool:
        """
        Whether C{user} may log in from C{host}.
        """
        try:
            networks = self.file.current()
        except OSError:
            return False
        allowed = networks.get(user)
        return allowed is None or inNetworks(host, allowed)
