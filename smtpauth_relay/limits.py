"""
Rate limits (C{[limits]}): what one login or one client address may do, so
a stolen password or a runaway script sends a bounded amount of mail.

  - messages and recipients per user per sliding hour: 451 4.7.1 at MAIL or
    RCPT once used up (the client retries later);
  - new connections per client address per minute: 421 4.7.0 at connect;
  - messages per session: 421 4.7.0, the client reconnects.

Counters live in the same store as the lockout (L{ILockoutStore}).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from smtpauth_relay.config import LimitsConfig
from smtpauth_relay.interfaces import ISessionLimits
from smtpauth_relay.lockout import ILockoutStore, MemoryLockoutStore
from smtpauth_relay.policy import clientAddress
from smtpauth_relay.trace import logSafe

log = Logger()

HOUR = 3600.0
MINUTE = 60.0


@implementer(ISessionLimits)
class RateLimits:
    """
    The rate limits of one relay; see the module docstring.
    """

    def __init__(
        self, settings: LimitsConfig, clock: Any, store: ILockoutStore | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.store: ILockoutStore = store if store is not None else MemoryLockoutStore()

    def connectionAllowed(self, host: str) -> bool:
        """
        Count a new connection from C{host}; whether it is within the limit.
        """
        limit = self.settings.connections_per_minute
        if not limit:
            return True
        address = clientAddress(host)
        key = f"rate:conn:{address if address is not None else host}"
        return self.store.hit(key, self.clock.seconds(), MINUTE) <= limit

    def messageAllowed(self, user: str) -> bool:
        """
        Whether C{user} may start another message this hour.
        """
        limit = self.settings.messages_per_hour
        allowed = not limit or (
            self.store.total(f"rate:msg:{user}", self.clock.seconds(), HOUR) < limit
        )
        if not allowed:
            log.warn(
                "{user} reached messages_per_hour ({limit})",
                user=logSafe(user),
                limit=limit,
            )
        return allowed

    def recipientAllowed(self, user: str, pending: int) -> bool:
        """
        Whether C{user} may add a recipient, with C{pending} recipients
        already accepted in the transaction under way.
        """
        limit = self.settings.recipients_per_hour
        if not limit:
            return True
        used = self.store.total(f"rate:rcpt:{user}", self.clock.seconds(), HOUR)
        allowed = used + pending < limit
        if not allowed:
            log.warn(
                "{user} reached recipients_per_hour ({limit})",
                user=logSafe(user),
                limit=limit,
            )
        return allowed

    def messageQueued(self, user: str, recipients: int) -> None:
        """
        Count a message C{user} sent, with its recipients.
        """
        now = self.clock.seconds()
        self.store.hit(f"rate:msg:{user}", now, HOUR)
        self.store.hit(f"rate:rcpt:{user}", now, HOUR, recipients)
