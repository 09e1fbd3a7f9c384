"""
The C{htpasswd} strcred checker: C{--auth htpasswd:/etc/smtpauth-relay/users}.

Every twistd run imports this file, so it imports nothing heavy: the checker
itself is imported when one is made.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer

from smtpauth_relay.interfaces import ICramMD5Credentials, IScramCredentials

if TYPE_CHECKING:
    from smtpauth_relay.checkers import HtpasswdChecker

htpasswdCheckerFactoryHelp = """
Checks user names and passwords against a password file in the htpasswd
format: one "user:hash" line per user, with blank lines and lines starting
with # ignored. The hashes may be bcrypt ($2a$, $2b$, $2y$, as written by
"htpasswd -B" and "smtpauth-relay passwd"), argon2id ($argon2id$) or
sha512-crypt ($6$, as written by "openssl passwd -6"). The file is read again
whenever it changes. The argument is the file's path, e.g.
htpasswd:/etc/smtpauth-relay/users
"""


@implementer(ICheckerFactory, IPlugin)
class HtpasswdCheckerFactory:
    """
    A factory for L{smtpauth_relay.checkers.HtpasswdChecker}.
    """

    authType = "htpasswd"
    authHelp = htpasswdCheckerFactoryHelp
    argStringFormat = "Path of an htpasswd-format password file."
    credentialInterfaces = (IUsernamePassword, IScramCredentials, ICramMD5Credentials)

    def generateChecker(self, argstring: str) -> HtpasswdChecker:
        """
        @param argstring: The password file's path.

        @return: A checker for that file.

        @raise ValueError: If C{argstring} is empty or names no file.
        """
        from smtpauth_relay.checkers import HtpasswdChecker

        if not argstring.strip():
            raise ValueError(
                f"{self.authType!r} requires the path of a password file,"
                f" e.g. {self.authType}:/etc/smtpauth-relay/users"
            )
        if not os.path.isfile(argstring):
            raise ValueError(
                f"{self.authType!r}: password file {argstring!r} does not exist"
                " or is not a file (create it with: smtpauth-relay passwd"
                f" {argstring} USER)"
            )
        return HtpasswdChecker(argstring)


theHtpasswdCheckerFactory = HtpasswdCheckerFactory()
