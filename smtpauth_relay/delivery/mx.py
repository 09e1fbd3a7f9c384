"""
MX delivery: each message goes straight to the mail exchangers of its
recipients' domains, found with twisted.names.

For each destination domain (one SMTP transaction per domain, all domains
at once):

  - the MX records are sorted by preference, hosts of equal preference are
    shuffled, duplicates dropped, and at most L{MXDelivery.maxHosts} hosts
    are tried per attempt;
  - a null MX (RFC 7505) is a permanent failure, and so is a domain that
    does not exist (NXDOMAIN); a domain without MX records is its own mail
    exchanger (RFC 5321 section 5.1); a DNS failure or timeout is
    temporary;
  - each mail exchanger's IPv6 and IPv4 addresses (both looked up with the
    same resolver) are tried in turn, interleaved, IPv6 first; a
    connection-level failure (refused, timeout, 421 greeting, TLS failure,
    dropped connection) moves on to the next address, while an SMTP reply
    to the transaction is final for the domain;
  - STARTTLS is opportunistic and unverified, as usual between MTAs: used
    when offered, and when the handshake (or the STARTTLS command) fails,
    the same address is tried once more without TLS;
  - address literals (C{bob@[192.0.2.1]}, C{bob@[IPv6:2001:db8::1]}) are
    delivered to that address, without DNS.

Connections go through one L{ConnectionPool} per address connected to (at
most C{maxPerDestination} connections each, reused for a burst), created
on demand and dropped once idle.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from random import Random
from typing import Any

from twisted.internet import protocol, ssl
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IResolver
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names.error import AuthoritativeDomainError, DNSNameError
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpauth_relay.delivery.client import (
    ClientSettings,
    Outbound,
    RelayClient,
    RelayClientFactory,
)
from smtpauth_relay.delivery.pool import ConnectionPool
from smtpauth_relay.envelope import DeliveryReport, Envelope
from smtpauth_relay.interfaces import IDeliveryAgent

log = Logger()

ConnectAddress = Callable[[str, int, RelayClientFactory], "Deferred[RelayClient]"]
"""Connects a factory to C{(ip, port)}: L{MXDelivery}'s connector seam."""

LOCAL_ADDRESS_REPLY = "550 5.4.4 refusing to deliver to a local or reserved address"
NULL_MX_REPLY = "556 5.1.10 domain does not accept mail (null MX)"
NOT_FOUND_REPLY = "550 5.1.2 domain not found"
NO_ADDRESS_REPLY = "550 5.1.2 domain has no MX or address records"
BAD_DOMAIN_REPLY = "553 5.1.3 bad destination domain"

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def makeResolver(reactor: Any, nameservers: Sequence[str]) -> IResolver:
    """
    A DNS resolver asking C{nameservers} (C{"192.0.2.53"},
    C{"127.0.0.1:5353"}, C{"::1"}, C{"[::1]:53"}), or those of
    C{/etc/resolv.conf} when there are none.

    @raise ValueError: for a nameserver that is not an IP address with an
        optional port.
    """
    if not nameservers:
        return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    return client.Resolver(
        servers=[parseNameserver(n) for n in nameservers], reactor=reactor
    )


def parseNameserver(value: str) -> tuple[str, int]:
    """
    C{(address, port)} for a C{[delivery] nameservers} entry.

    @raise ValueError: if C{value} is not an IP address with an optional
        port (C{[address]:port} for IPv6).
    """
    host, port = value, "53"
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad nameserver {value!r}")
        if rest:
            port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {value!r} is not an IP address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"nameserver {value!r} has a bad port")
    return str(address), int(port)


def recipientDomain(recipient: str) -> str:
    """
    The domain part of C{recipient} (after its last C{@}), or C{""}.
    """
    before, at, domain = recipient.rpartition("@")
    return domain if at else ""


def addressLiteral(domain: str) -> str | None:
    """
    The IP address in an address literal (C{[192.0.2.1]},
    C{[IPv6:2001:db8::1]}), or C{None} if C{domain} is not one.

    @raise ValueError: for a bracketed domain that is not a valid IPv4 or
        IPv6 address literal (RFC 5321 section 4.1.3).
    """
    if not domain.startswith("["):
        return None
    if not domain.endswith("]"):
        raise ValueError(f"bad address literal {domain}")
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(
            inner[5:]
        )
    else:
        address = ipaddress.IPv4Address(inner)
    return str(address)


@dataclass(frozen=True)
class _Destination:
    """
    A mail exchanger: its name, and its addresses when already known (an
    address literal).
    """

    host: str
    addresses: tuple[str, ...] | None = None


class _Outcome(Exception):
    """
    Why a whole domain is finished without a transaction: C{reply} for all
    its recipients, permanent or not.

    @ivar host: the mail exchanger tried last, if any.
    """

    def __init__(self, reply: str, permanent: bool, host: str = "") -> None:
        Exception.__init__(self, reply)
        self.reply = reply
        self.permanent = permanent
        self.host = host


class _ConnectionFailed(Exception):
    """
    An address could not take the transaction (connection-level).

    @ivar tlsFailed: whether STARTTLS was attempted and did not succeed.
    """

    def __init__(self, reason: str, tlsFailed: bool) -> None:
        Exception.__init__(self, reason)
        self.tlsFailed = tlsFailed


class MXClient(RelayClient):
    """
    A L{RelayClient} that notices a failed STARTTLS (refused, or a failed
    handshake), so the address can be tried again without TLS.
    """

    tlsAttempted = False
    ready = False
    mxFactory: MXClientFactory | None = None

    def tryTLS(self, code: int, resp: bytes, items: dict[bytes, Any]) -> None:
        if not self._tlsMode and self.context and b"STARTTLS" in items:
            self.tlsAttempted = True
        RelayClient.tryTLS(self, code, resp, items)

    def smtpState_from(self, code: int, resp: bytes) -> None:
        if not self.ready:
            self.ready = True
            if self.tlsAttempted and self.mxFactory is not None:
                self.mxFactory.tlsFailed = False
        RelayClient.smtpState_from(self, code, resp)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.tlsAttempted and not self.ready and self.mxFactory is not None:
            self.mxFactory.tlsFailed = True
        RelayClient.connectionLost(self, reason)


class MXClientFactory(RelayClientFactory):
    """
    Builds L{MXClient}s.

    @ivar tlsFailed: whether STARTTLS failed on the last connection that
        tried it.
    """

    tlsFailed = False

    def buildProtocol(self, addr: Any) -> MXClient:
        assert self.queue is not None, "no queue: give the factory to a pool"
        client = MXClient(self.settings, self.queue, self.clock)
        client.factory = self
        client.mxFactory = self
        return client


class _DestinationPool(ConnectionPool):
    """
    A L{ConnectionPool} that tells its owner when its last connection is
    gone.
    """

    onGone: Callable[[_DestinationPool], None] | None = None

    def isEmpty(self) -> bool:
        """
        Whether no connection is open or being opened, and nothing waits.
        """
        return (
            not self.clients
            and not self.connecting
            and all(o.done for o in self.waiting)
        )

    def clientGone(self, client: RelayClient, reason: Failure) -> None:
        ConnectionPool.clientGone(self, client, reason)
        if self.onGone is not None:
            self.onGone(self)


PoolKey = tuple[str, int, bool]
"""C{(ip, port, STARTTLS offered to the server)}."""


@implementer(IDeliveryAgent)
class MXDelivery:
    """
    Sends each message to its recipients' mail exchangers; see the module
    docstring.

    @cvar maxHosts: mail exchangers tried per domain and attempt.
    @cvar maxAddresses: addresses tried per domain and attempt.
    @ivar pools: the connection pools in use, by address.
    """

    maxHosts = 5
    maxAddresses = 10

    def __init__(
        self,
        reactor: Any,
        resolver: IResolver,
        heloName: str,
        port: int = 25,
        maxPerDestination: int = 2,
        connectTimeout: float = 30.0,
        timeout: float = 600.0,
        random: Random | None = None,
        connect: ConnectAddress | None = None,
        tlsOptions: Any = None,
        linger: float = 2.0,
        allowLoopback: bool = False,
    ) -> None:
        """
        @param reactor: for connections (unless C{connect} is given) and
            time.
        @param resolver: answers the MX, A and AAAA lookups.
        @param heloName: our name in EHLO.
        @param port: the SMTP port of mail exchangers.
        @param maxPerDestination: connections at once to one address.
        @param connectTimeout: seconds to wait for a connection.
        @param timeout: seconds one domain's delivery may take in all (each
            message also has that deadline in its pool).
        @param random: shuffles mail exchangers of equal preference.
        @param connect: opens a connection to C{(ip, port)} with a factory;
            TCP endpoints on C{reactor} by default.
        @param tlsOptions: the STARTTLS context factory; unverified
            L{ssl.CertificateOptions} by default.
        @param linger: seconds an idle connection waits for another message.
        @param allowLoopback: whether loopback addresses may be delivered to
            (only for tests on one machine).
        """
        self.reactor = reactor
        # IResolver's annotations do not match what its lookups take and
        # return (an optional timeout; lists of records).
        self.resolver: Any = resolver
        self.heloName = heloName
        self.port = port
        self.maxPerDestination = maxPerDestination
        self.connectTimeout = connectTimeout
        self.timeout = timeout
        self.random = random if random is not None else Random()
        self.allowLoopback = allowLoopback
        self._connect = connect if connect is not None else self._tcpConnect
        self.tlsOptions = (
            tlsOptions
            if tlsOptions is not None
            else ssl.CertificateOptions(verify=False)
        )
        self.linger = linger
        self.pools: dict[PoolKey, _DestinationPool] = {}
        self._closing = False
        self._closed: list[Deferred[None]] = []

    # -- IDeliveryAgent ----------------------------------------------------

    def deliver(self, envelope: Envelope, messagePath: str) -> Deferred[DeliveryReport]:
        """
        One transaction per destination domain, all at once; the reports
        are merged.
        """
        byDomain: dict[str, list[str]] = {}
        for recipient in envelope.recipients:
            key = recipientDomain(recipient).lower().rstrip(".")
            byDomain.setdefault(key, []).append(recipient)
        if not byDomain:
            return succeed(DeliveryReport())
        attempts = [
            Deferred.fromCoroutine(
                self._deliverDomain(
                    recipientDomain(recipients[0]),
                    replace(envelope, recipients=tuple(recipients)),
                    messagePath,
                )
            )
            for recipients in byDomain.values()
        ]
        merged: Deferred[DeliveryReport] = DeferredList(
            attempts, fireOnOneErrback=True, consumeErrors=True
        ).addCallback(
            lambda results: mergeReports(envelope, [report for _, report in results])
        )
        return merged

    # -- one domain --------------------------------------------------------

    async def _deliverDomain(
        self, domain: str, envelope: Envelope, messagePath: str
    ) -> DeliveryReport:
        try:
            return await self._tryDestinations(domain, envelope, messagePath)
        except _Outcome as outcome:
            log.info(
                "{queueId}: {domain}: {reply}",
                queueId=envelope.queueId,
                domain=domain,
                reply=outcome.reply,
            )
            return _reportAll(envelope, outcome.reply, outcome.permanent, outcome.host)
        except Exception:
            log.failure(
                "{queueId}: delivery to {domain} failed unexpectedly",
                queueId=envelope.queueId,
                domain=domain,
            )
            return _reportAll(
                envelope, f"local error delivering to {domain}", permanent=False
            )

    def _usable(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """
        Whether mail may go to C{address}: never to unspecified, multicast,
        link-local or reserved addresses, nor to loopback (an address
        literal or an MX pointing at ourselves would loop, or reach services
        on this host) unless C{allowLoopback} was given (tests).
        """
        if address.is_unspecified or address.is_multicast or address.is_link_local:
            return False
        if address.is_loopback:
            return self.allowLoopback
        return not address.is_reserved

    async def _tryDestinations(
        self, domain: str, envelope: Envelope, messagePath: str
    ) -> DeliveryReport:
        start = self.reactor.seconds()
        destinations, implicit = await self._destinations(domain)
        lastError: str | None = None
        lastHost = ""
        tried = 0
        for destination in destinations[: self.maxHosts]:
            if destination.addresses is not None:
                addresses: Sequence[str] = destination.addresses
            else:
                addresses, error = await self._addresses(destination.host)
                if not addresses:
                    if error is None and implicit:
                        raise _Outcome(NO_ADDRESS_REPLY, permanent=True)
                    lastError = error or f"{destination.host}: no address records"
                    continue
            for address in addresses:
                if tried >= self.maxAddresses:
                    break
                if self.reactor.seconds() - start >= self.timeout:
                    raise _Outcome(
                        f"no delivery to {domain} within {self.timeout:.0f}s: "
                        f"{lastError}",
                        permanent=False,
                        host=lastHost,
                    )
                tried += 1
                lastHost = destination.host
                try:
                    report = await self._sendVia(
                        destination.host, address, envelope, messagePath
                    )
                except _ConnectionFailed as e:
                    lastError = str(e)
                    log.info(
                        "{queueId}: {domain}: {reason}",
                        queueId=envelope.queueId,
                        domain=domain,
                        reason=lastError,
                    )
                    continue
                return replace(report, host=destination.host)
        raise _Outcome(
            lastError or f"no usable mail exchanger for {domain}",
            permanent=False,
            host=lastHost,
        )

    async def _destinations(self, domain: str) -> tuple[list[_Destination], bool]:
        """
        The mail exchangers of C{domain}, in the order to try them, and
        whether the domain is its own (implicit) mail exchanger.

        @raise _Outcome: when no transaction can be attempted.
        """
        try:
            literal = addressLiteral(domain)
        except ValueError:
            raise _Outcome(BAD_DOMAIN_REPLY, permanent=True) from None
        if literal is not None:
            if not self._usable(ipaddress.ip_address(literal)):
                raise _Outcome(LOCAL_ADDRESS_REPLY, permanent=True)
            return [_Destination(domain, (literal,))], False
        try:
            name = domain.rstrip(".").encode("idna").decode("ascii")
        except UnicodeError:
            raise _Outcome(BAD_DOMAIN_REPLY, permanent=True) from None
        if not _HOSTNAME.fullmatch(name):
            raise _Outcome(BAD_DOMAIN_REPLY, permanent=True)
        try:
            answers, _, _ = await self.resolver.lookupMailExchange(name)
        except (DNSNameError, AuthoritativeDomainError):
            raise _Outcome(NOT_FOUND_REPLY, permanent=True) from None
        except Exception as e:
            raise _Outcome(
                f"451 4.4.3 MX lookup for {name} failed: {_describe(e)}",
                permanent=False,
            ) from None
        records = [
            (rr.payload.preference, str(rr.payload.name).rstrip("."))
            for rr in answers
            if rr.type == dns.MX and rr.payload is not None
        ]
        if not records:
            return [_Destination(name)], True
        if all(host == "" for _, host in records):
            raise _Outcome(NULL_MX_REPLY, permanent=True)
        return [_Destination(h) for h in self.orderExchangers(records)], False

    def orderExchangers(self, records: Iterable[tuple[int, str]]) -> list[str]:
        """
        Mail exchanger names by preference, equal ones shuffled, each once;
        null and malformed names dropped.
        """
        seen: set[str] = set()
        byPreference: dict[int, list[str]] = {}
        for preference, host in sorted(records, key=lambda r: r[0]):
            key = host.lower()
            if not host or key in seen or not _HOSTNAME.fullmatch(host):
                continue
            seen.add(key)
            byPreference.setdefault(preference, []).append(host)
        ordered: list[str] = []
        for preference in sorted(byPreference):
            hosts = byPreference[preference]
            self.random.shuffle(hosts)
            ordered.extend(hosts)
        return ordered

    async def _addresses(self, host: str) -> tuple[list[str], str | None]:
        """
        The addresses of C{host} to try, IPv6 and IPv4 interleaved, and
        why some could not be looked up (C{None} if all lookups answered).
        """
        results = await DeferredList(
            [
                self.resolver.lookupIPV6Address(host),
                self.resolver.lookupAddress(host),
            ],
            consumeErrors=True,
        )
        families: list[list[str]] = []
        errors: list[str] = []
        for (ok, result), wanted in zip(results, (dns.AAAA, dns.A), strict=True):
            found: list[str] = []
            if ok:
                for rr in result[0]:
                    if rr.type != wanted or rr.payload is None:
                        continue
                    address = ipaddress.ip_address(rr.payload.address)
                    if not self._usable(address):
                        continue
                    if str(address) not in found:
                        found.append(str(address))
            elif not result.check(DNSNameError, AuthoritativeDomainError):
                kind = "AAAA" if wanted == dns.AAAA else "A"
                errors.append(
                    f"{kind} lookup for {host} failed: {_describe(result.value)}"
                )
            families.append(found)
        ipv6, ipv4 = families
        interleaved: list[str] = []
        for i in range(max(len(ipv6), len(ipv4))):
            interleaved += ipv6[i : i + 1] + ipv4[i : i + 1]
        reason = "451 4.4.3 " + "; ".join(errors) if errors else None
        return interleaved, reason

    # -- one address -------------------------------------------------------

    async def _sendVia(
        self, host: str, address: str, envelope: Envelope, messagePath: str
    ) -> DeliveryReport:
        """
        The transaction over C{address}: with STARTTLS when offered, and
        once more without it if that fails.

        @raise _ConnectionFailed: if the address did not take it.
        """
        try:
            return await self._send(host, address, True, envelope, messagePath)
        except _ConnectionFailed as e:
            if not e.tlsFailed:
                raise
            log.info(
                "{queueId}: STARTTLS with {host}[{address}] failed ({reason}); "
                "trying again without TLS",
                queueId=envelope.queueId,
                host=host,
                address=address,
                reason=str(e),
            )
        return await self._send(host, address, False, envelope, messagePath)

    async def _send(
        self,
        host: str,
        address: str,
        useTLS: bool,
        envelope: Envelope,
        messagePath: str,
    ) -> DeliveryReport:
        pool = self._pool(host, address, useTLS)
        factory = pool.factory
        assert isinstance(factory, MXClientFactory)
        try:
            return await pool.send(Outbound(envelope, messagePath))
        except Exception as e:
            raise _ConnectionFailed(
                _describe(e), useTLS and factory.tlsFailed
            ) from None
        finally:
            self._poolChanged(pool)

    def _pool(self, host: str, address: str, useTLS: bool) -> _DestinationPool:
        key = (address, self.port, useTLS)
        pool = self.pools.get(key)
        if pool is not None:
            return pool
        for otherKey, other in list(self.pools.items()):
            if other.isEmpty():
                del self.pools[otherKey]
        settings = ClientSettings(
            heloName=self.heloName,
            # Errors read "mx.example.net[192.0.2.1]: Connection refused".
            host=host if host.startswith("[") else f"{host}[{address}]",
            startTLS=self.tlsOptions if useTLS else None,
            requireTLS=False,
        )
        port = self.port

        def connect(factory: RelayClientFactory) -> Deferred[RelayClient]:
            # The pool has no word for "a connection attempt ended": relay
            # the outcome to it, then look whether it is idle now.
            result: Deferred[RelayClient] = Deferred()

            def done(outcome: RelayClient | Failure) -> None:
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)
                self._poolChanged(new)

            maybeDeferred(self._connect, address, port, factory).addBoth(done)
            return result

        new = _DestinationPool(
            MXClientFactory(settings),
            connect,
            self.reactor,
            maxConnections=self.maxPerDestination,
            linger=0 if self._closing else self.linger,
            deadline=self.timeout,
        )
        new.onGone = self._poolChanged
        self.pools[key] = new
        return new

    def _tcpConnect(
        self, address: str, port: int, factory: RelayClientFactory
    ) -> Deferred[RelayClient]:
        endpoint: TCP4ClientEndpoint | TCP6ClientEndpoint
        if ":" in address:
            endpoint = TCP6ClientEndpoint(
                self.reactor, address, port, timeout=self.connectTimeout
            )
        else:
            endpoint = TCP4ClientEndpoint(
                self.reactor, address, port, timeout=self.connectTimeout
            )
        connected: Deferred[Any] = endpoint.connect(factory)
        return connected

    # -- shutting down -----------------------------------------------------

    def _poolChanged(self, pool: _DestinationPool) -> None:
        if pool.isEmpty():
            for key, other in list(self.pools.items()):
                if other is pool:
                    del self.pools[key]
        self._checkClosed()

    def _checkClosed(self) -> None:
        if not self._closing or any(not p.isEmpty() for p in self.pools.values()):
            return
        self.pools.clear()
        waiting, self._closed = self._closed, []
        for d in waiting:
            d.callback(None)

    def close(self) -> Deferred[None]:
        """
        Stop keeping idle connections: those lingering QUIT now, later ones
        QUIT as soon as their queue is empty.

        @return: a L{Deferred} firing once no connection is left (messages
            under way are finished first).
        """
        self._closing = True
        d: Deferred[None] = Deferred()
        self._closed.append(d)
        for pool in list(self.pools.values()):
            pool.linger = 0
            for relayClient in list(pool.clients):
                relayClient.quitIfIdle()
        self._checkClosed()
        return d


def _describe(error: BaseException) -> str:
    text = " ".join((str(error) or type(error).__name__).split())
    host = getattr(error, "host", "")
    return f"{host}: {text}" if host and not text.startswith(host) else text


def _reportAll(
    envelope: Envelope, reply: str, permanent: bool, host: str = ""
) -> DeliveryReport:
    outcome = {r: reply for r in envelope.recipients}
    if permanent:
        return DeliveryReport(failed=outcome, host=host)
    return DeliveryReport(deferred=outcome, host=host)


def mergeReports(
    envelope: Envelope, reports: Iterable[DeliveryReport]
) -> DeliveryReport:
    """
    One report for C{envelope} from its domains' reports: recipients in
    envelope order, and the hosts talked to, comma-separated.
    """
    delivered: set[str] = set()
    deferred: dict[str, str] = {}
    failed: dict[str, str] = {}
    hosts: list[str] = []
    for report in reports:
        delivered.update(report.delivered)
        deferred.update(report.deferred)
        failed.update(report.failed)
        if report.host and report.host not in hosts:
            hosts.append(report.host)
    order = {r: i for i, r in reversed(list(enumerate(envelope.recipients)))}

    def inOrder(recipients: Iterable[str]) -> list[str]:
        return sorted(recipients, key=lambda r: order.get(r, len(order)))

    return DeliveryReport(
        delivered=tuple(inOrder(delivered)),
        deferred={r: deferred[r] for r in inOrder(deferred)},
        failed={r: failed[r] for r in inOrder(failed)},
        host=", ".join(hosts),
    )
