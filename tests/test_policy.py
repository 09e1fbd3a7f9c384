"""
Tests for L{smtpauth_relay.policy}.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.envelope import NULL_AUTH
from smtpauth_relay.policy import RelayPolicy, clientAddress, inNetworks


def nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


class ClientAddressTests(SynchronousTestCase):
    """
    Tests for L{clientAddress}.
    """

    def test_ipv4(self) -> None:
        """
        A dotted quad is an IPv4 address.
        """
        self.assertEqual(clientAddress("192.0.2.1"), ipaddress.IPv4Address("192.0.2.1"))

    def test_ipv6(self) -> None:
        """
        An IPv6 address is an IPv6 address, whatever its spelling.
        """
        self.assertEqual(
            clientAddress("2001:DB8:0::1"), ipaddress.IPv6Address("2001:db8::1")
        )

    def test_ipv4Mapped(self) -> None:
        """
        An IPv4-mapped IPv6 address, as a dual-stack socket reports an IPv4
        client, becomes the IPv4 address.
        """
        address = clientAddress("::ffff:192.0.2.7")
        self.assertEqual(address, ipaddress.IPv4Address("192.0.2.7"))
        self.assertIsInstance(address, ipaddress.IPv4Address)

    def test_zoneId(self) -> None:
        """
        The zone of a scoped (link-local) address is dropped.
        """
        self.assertEqual(
            clientAddress("fe80::1%eth0"), ipaddress.IPv6Address("fe80::1")
        )

    def test_notAnAddress(self) -> None:
        """
        A UNIX socket path, a host name or an empty string is no address.
        """
        for host in ("/run/smtpauth-relay.sock", "", "localhost", "192.0.2", "::g"):
            self.assertIsNone(clientAddress(host), host)

    @settings(derandomize=True, max_examples=300)
    @given(st.text(max_size=60))
    def test_anyText(self, host: str) -> None:
        """
        Any text gives an address or C{None}; nothing raises.
        """
        result = clientAddress(host)
        self.assertIsInstance(
            result, (ipaddress.IPv4Address, ipaddress.IPv6Address, type(None))
        )


class InNetworksTests(SynchronousTestCase):
    """
    Tests for L{inNetworks}.
    """

    def test_match(self) -> None:
        """
        An address inside one of the networks matches, one outside does not.
        """
        networks = nets("192.0.2.0/24", "2001:db8::/32")
        self.assertTrue(inNetworks("192.0.2.200", networks))
        self.assertTrue(inNetworks("2001:db8:1::5", networks))
        self.assertFalse(inNetworks("198.51.100.1", networks))
        self.assertFalse(inNetworks("2001:db9::1", networks))

    def test_noNetworks(self) -> None:
        """
        Nothing is in no networks.
        """
        self.assertFalse(inNetworks("127.0.0.1", ()))

    def test_mappedMatchesIPv4(self) -> None:
        """
        An IPv4-mapped client matches IPv4 networks, and not an IPv6 network
        spelled over the mapped range.
        """
        self.assertTrue(inNetworks("::ffff:10.1.2.3", nets("10.0.0.0/8")))
        self.assertFalse(inNetworks("::ffff:10.1.2.3", nets("::ffff:0:0/96")))

    def test_zoneMatches(self) -> None:
        """
        A scoped address matches the network of its unscoped form.
        """
        self.assertTrue(inNetworks("fe80::1%eth0", nets("fe80::/10")))

    def test_unixNeverTrusted(self) -> None:
        """
        A non-IP peer is in no network, not even one covering everything.
        """
        self.assertFalse(inNetworks("/run/relay.sock", nets("0.0.0.0/0", "::/0")))


class RelayPolicyTests(SynchronousTestCase):
    """
    Tests for L{RelayPolicy}.
    """

    def setUp(self) -> None:
        self.policy = RelayPolicy(
            trustedNetworks=nets("10.0.0.0/8", "fd00::/8"),
            trustedRelays=nets("192.0.2.0/24"),
        )

    def test_authenticatedMayRelay(self) -> None:
        """
        An authenticated client may relay from anywhere, including a UNIX
        socket.
        """
        self.assertTrue(self.policy.mayRelay("198.51.100.1", "alice"))
        self.assertTrue(self.policy.mayRelay("/run/relay.sock", "alice"))

    def test_trustedNetworkMayRelay(self) -> None:
        """
        A client in a trusted network may relay without authenticating, also
        when it connects over an IPv4-mapped address.
        """
        self.assertTrue(self.policy.mayRelay("10.9.8.7", None))
        self.assertTrue(self.policy.mayRelay("::ffff:10.9.8.7", None))
        self.assertTrue(self.policy.mayRelay("fd12::1", None))

    def test_othersMayNotRelay(self) -> None:
        """
        An unauthenticated client outside the trusted networks may not relay;
        a trusted relay is not a trusted network, and a non-IP peer is never
        trusted.
        """
        self.assertFalse(self.policy.mayRelay("198.51.100.1", None))
        self.assertFalse(self.policy.mayRelay("192.0.2.1", None))
        self.assertFalse(self.policy.mayRelay("/run/relay.sock", None))

    def test_closedByDefault(self) -> None:
        """
        The default policy lets nobody relay without AUTH.
        """
        policy = RelayPolicy()
        for host in ("127.0.0.1", "::1", "10.0.0.1", "/run/relay.sock"):
            self.assertFalse(policy.mayRelay(host, None), host)

    def test_envelopeAuthTrustedRelay(self) -> None:
        """
        A trusted relay's C{AUTH=} value is recorded as given, even when the
        session did not authenticate.
        """
        self.assertEqual(
            self.policy.envelopeAuth("192.0.2.9", None, "carol@example.org"),
            "carol@example.org",
        )
        self.assertEqual(
            self.policy.envelopeAuth("192.0.2.9", "alice", "carol@example.org"),
            "carol@example.org",
        )
        self.assertEqual(self.policy.envelopeAuth("192.0.2.9", None, "<>"), "<>")

    def test_envelopeAuthTrustedRelayNoValue(self) -> None:
        """
        A trusted relay that gave no C{AUTH=} gets its session's identity, or
        C{<>}.
        """
        self.assertEqual(self.policy.envelopeAuth("192.0.2.9", None, None), NULL_AUTH)
        self.assertEqual(self.policy.envelopeAuth("192.0.2.9", "alice", None), "alice")

    def test_envelopeAuthAuthenticated(self) -> None:
        """
        Elsewhere an authenticated client's claim is replaced by its login
        name, unless it asked for C{AUTH=<>}.
        """
        self.assertEqual(
            self.policy.envelopeAuth("198.51.100.1", "alice", "mallory"), "alice"
        )
        self.assertEqual(
            self.policy.envelopeAuth("198.51.100.1", "alice", None), "alice"
        )
        self.assertEqual(
            self.policy.envelopeAuth("198.51.100.1", "alice", NULL_AUTH), NULL_AUTH
        )

    def test_envelopeAuthUnauthenticated(self) -> None:
        """
        An unauthenticated client, trusted network or not, is recorded as
        C{<>} whatever it claims.
        """
        for host in ("198.51.100.1", "10.0.0.1", "/run/relay.sock"):
            self.assertEqual(
                self.policy.envelopeAuth(host, None, "alice"), NULL_AUTH, host
            )
            self.assertEqual(self.policy.envelopeAuth(host, None, None), NULL_AUTH)

    def test_envelopeAuthMappedRelay(self) -> None:
        """
        A trusted relay connecting over an IPv4-mapped address is still
        believed.
        """
        self.assertEqual(
            self.policy.envelopeAuth("::ffff:192.0.2.9", None, "carol"), "carol"
        )

    @settings(derandomize=True, max_examples=300)
    @given(
        host=st.one_of(
            st.ip_addresses().map(str), st.just("/run/relay.sock"), st.text(max_size=10)
        ),
        user=st.one_of(st.none(), st.text(min_size=1, max_size=10)),
        given_=st.one_of(st.none(), st.just(NULL_AUTH), st.text(max_size=10)),
    )
    def test_envelopeAuthOnlyOwnIdentity(
        self, host: str, user: str | None, given_: str | None
    ) -> None:
        """
        Outside the trusted relays the recorded C{AUTH=} is only ever the
        session's own login name or C{<>}.
        """
        if inNetworks(host, self.policy.trustedRelays):
            return
        self.assertIn(self.policy.envelopeAuth(host, user, given_), (user, NULL_AUTH))
