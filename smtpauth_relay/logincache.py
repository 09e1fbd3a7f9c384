"""
A positive login cache: remembers for a while that a user name and password
were accepted, without keeping the password, so that a device sending many
messages does not cost a password check (a slow hash, a round trip to a
server) at every session.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class _CacheEntry:
    salt: bytes
    digest: bytes
    expires: float


class LoginCache:
    """
    Remembers, for C{ttl} seconds after a successful login, that a user
    name and password were accepted, so that a device sending many messages
    does not have the same password checked every time.

    The password itself is never kept: each entry holds a random salt and
    HMAC-SHA256(key, salt || user || password), where the key is random,
    made when the cache is, and kept only in memory.  Whoever reads the
    process's memory could test password guesses against an entry only with
    that key; the entries are useless anywhere else and lost at restart.

    An entry expires C{ttl} seconds after the login that made it (a hit does
    not extend it), so a changed password or a disabled account is noticed
    within C{ttl}; a refused login removes the user's entry at
    once.  At most C{maxEntries} are kept (the oldest go first).

    @ivar ttl: Seconds an entry lasts; 0 disables the cache.
    """

    maxEntries = 10000

    def __init__(self, ttl: float, now: Callable[[], float]) -> None:
        """
        @param ttl: See L{ttl}.
        @param now: Gives the current time in seconds (a clock's
            C{seconds}).
        """
        self.ttl = ttl
        self._now = now
        self._key = os.urandom(32)
        self._entries: OrderedDict[str, _CacheEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, username: object) -> bool:
        return username in self._entries

    def _digest(self, salt: bytes, username: str, password: bytes) -> bytes:
        name = username.encode("utf-8")
        message = salt + len(name).to_bytes(4, "big") + name + password
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def check(self, username: str, password: bytes) -> bool:
        """
        Whether C{username} logged in with C{password} less than C{ttl}
        seconds ago.  An expired entry is removed.
        """
        if self.ttl <= 0:
            return False
        entry = self._entries.get(username)
        if entry is None:
            return False
        if self._now() >= entry.expires:
            del self._entries[username]
            return False
        return hmac.compare_digest(
            entry.digest, self._digest(entry.salt, username, password)
        )

    def store(self, username: str, password: bytes) -> None:
        """
        Remember that C{username} just logged in with C{password}.
        """
        if self.ttl <= 0:
            return
        salt = os.urandom(16)
        self._entries.pop(username, None)
        self._entries[username] = _CacheEntry(
            salt,
            self._digest(salt, username, password),
            self._now() + self.ttl,
        )
        while len(self._entries) > self.maxEntries:
            self._entries.popitem(last=False)

    def evict(self, username: str) -> None:
        """
        Forget C{username}'s entry, if any.
        """
        self._entries.pop(username, None)
