"""
Relay decisions: who may submit, and whose C{AUTH=} to believe.

Pure decisions on addresses and session state; no I/O.  The server protocol
asks, and turns C{False} into 530 5.7.0.

The relay is closed by construction: a client that neither authenticated nor
connects from C{[relay] trusted_networks} may not give C{MAIL} at all, so no
recipient syntax (percent hack, source routes, quoted C{@}) can make it relay.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from smtpauth_relay.envelope import NULL_AUTH

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def clientAddress(host: str) -> IPAddress | None:
    """
    Parse a peer's address; an IPv4-mapped IPv6 address (C{::ffff:a.b.c.d}, as
    a dual-stack socket reports IPv4 clients) becomes the IPv4 address, so it
    matches IPv4 networks and nothing else.

    @return: the address, or C{None} when C{host} is not an IP address (a
        UNIX socket peer).
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def inNetworks(host: str, networks: Iterable[IPNetwork]) -> bool:
    """
    Whether the peer C{host} lies in one of C{networks}.
    """
    address = clientAddress(host)
    if address is None:
        return False
    return any(address in network for network in networks)


@dataclass(frozen=True)
class RelayPolicy:
    """
    @ivar trustedNetworks: clients that may relay without AUTH.
    @ivar trustedRelays: clients whose C{AUTH=} on C{MAIL FROM} is believed.
    """

    trustedNetworks: tuple[IPNetwork, ...] = ()
    trustedRelays: tuple[IPNetwork, ...] = ()

    def mayRelay(self, host: str, authenticatedUser: str | None) -> bool:
        """
        Whether this client may submit mail at all.
        """
        return authenticatedUser is not None or inNetworks(host, self.trustedNetworks)

    def envelopeAuth(
        self, host: str, authenticatedUser: str | None, given: str | None
    ) -> str:
        """
        The C{AUTH=} value to record for a transaction (RFC 4954 section 5).

        A trusted relay's own value is kept as given.  Otherwise only the
        session's own identity may be recorded: an authenticated client gets
        its login name (or C{<>} if it asked for C{AUTH=<>}), and everybody
        else C{<>}, whatever they claimed.
        """
        if given is not None and inNetworks(host, self.trustedRelays):
            return given
        if authenticatedUser is None or given == NULL_AUTH:
            return NULL_AUTH
        return authenticatedUser
