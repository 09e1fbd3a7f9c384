"""
The C{ldap} strcred checker:
C{--auth ldap:ldaps://ldap.example.org/?dn=uid=%s,ou=people,dc=example,dc=org}.

Every twistd run imports this file, so it imports nothing heavy: the checker
(and ldaptor) is imported when one is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer

if TYPE_CHECKING:
    from smtpauth_relay.ldapchecker import LDAPChecker

ldapCheckerFactoryHelp = """
Checks user names and passwords by binding to an LDAP server (OpenLDAP,
Active Directory) as the user, over TLS with the server's certificate
verified. The argument is the server's URL (ldaps://HOST[:PORT]/, or
ldap://HOST[:PORT]/ with starttls=yes) with options as query parameters.
Either dn=TEMPLATE binds as that DN, with %s (or {user}) replaced by the
user name, e.g.
ldap:ldaps://ldap.example.org/?dn=uid=%s,ou=people,dc=example,dc=org
or base=DN&filter=FILTER searches for the user (as bind_dn= with the
password in bind_password_file=, or anonymously) and binds as the one entry
found, e.g.
ldap:ldap://dc1.example.org/?starttls=yes&base=dc=example,dc=org&filter=(sAMAccountName=%s)&bind_dn=cn=relay,cn=Users,dc=example,dc=org&bind_password_file=/etc/smtpauth-relay/ldap.pass
Other options: ca_file=PEM (CAs to trust instead of the system's),
scope=sub|one, timeout=SECONDS (default 10), insecure=yes (plain ldap://
to a loopback address only).
"""


@implementer(ICheckerFactory, IPlugin)
class LDAPCheckerFactory:
    """
    A factory for L{smtpauth_relay.ldapchecker.LDAPChecker}.
    """

    authType = "ldap"
    authHelp = ldapCheckerFactoryHelp
    argStringFormat = (
        "ldaps://HOST[:PORT]/?dn=TEMPLATE or"
        " ldaps://HOST/?base=DN&filter=FILTER[&bind_dn=DN&bind_password_file=PATH],"
        " with options starttls, ca_file, scope, timeout, insecure."
    )
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str) -> LDAPChecker:
        """
        @param argstring: The server's URL and the options.

        @return: A checker for that server.

        @raise ValueError: Naming the option at fault, if any is missing,
            unknown or invalid.
        """
        from smtpauth_relay.ldapchecker import LDAPChecker, parseArgument

        if not argstring.strip():
            raise ValueError(
                f"{self.authType!r} requires the LDAP server's URL and options, e.g."
                f" {self.authType}:ldaps://ldap.example.org/"
                "?dn=uid=%s,ou=people,dc=example,dc=org"
            )
        try:
            settings = parseArgument(argstring)
        except ValueError as e:
            raise ValueError(f"{self.authType}: {e}") from None
        return LDAPChecker(settings)


theLDAPCheckerFactory = LDAPCheckerFactory()
