"""
The C{imap} strcred checker: C{--auth imap:imaps://mail.example.org}.

Every twistd run imports this file, so it imports nothing heavy: the checker
itself is imported when one is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer

if TYPE_CHECKING:
    from smtpauth_relay.imapchecker import IMAPChecker

imapCheckerFactoryHelp = """
Checks user names and passwords by logging in to an IMAP server (the
office's mail server) with them, over TLS: imaps://host[:993], or
imap://host[:143]?starttls=yes. The server's certificate must be valid for
the host name, signed by a CA the system trusts or by one in ca_file=PATH.
Options: starttls=yes, ca_file=PATH, timeout=SECONDS (default 10),
cache=SECONDS (remember a successful login that long; default 0, off),
allow_plaintext=yes (imap:// without TLS, loopback servers only). The IMAP
server cannot tell an unknown user from a wrong password, so list this
checker last. E.g. imap:imaps://mail.example.org?cache=300
"""


@implementer(ICheckerFactory, IPlugin)
class IMAPCheckerFactory:
    """
    A factory for L{smtpauth_relay.imapchecker.IMAPChecker}.
    """

    authType = "imap"
    authHelp = imapCheckerFactoryHelp
    argStringFormat = (
        "URL of the IMAP server: imaps://HOST[:PORT] or"
        " imap://HOST[:PORT]?starttls=yes, options after ?"
    )
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str) -> IMAPChecker:
        """
        @param argstring: The server's URL with options.

        @return: A checker for that server.

        @raise ValueError: If C{argstring} is invalid, naming the option.
        """
        from smtpauth_relay.imapchecker import checkerFromArgument

        return checkerFromArgument(argstring)


theIMAPCheckerFactory = IMAPCheckerFactory()
