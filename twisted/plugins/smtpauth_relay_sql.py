"""
The C{sql} strcred checker: password hashes looked up in SQLite or
PostgreSQL, e.g.
C{--auth "sql:sqlite:////var/lib/smtpauth-relay/users.db?query=SELECT password FROM users WHERE name = :user"}.

Every twistd run imports this file, so it imports nothing heavy: the checker
itself (and the database driver) is imported when one is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer

if TYPE_CHECKING:
    from smtpauth_relay.sqlchecker import SQLChecker

sqlCheckerFactoryHelp = """
Checks user names and passwords against hashes looked up in an SQL database,
SQLite or PostgreSQL (the latter needs psycopg 3: pip install
'smtpauth-relay[sql]'). The argument is the database's URL, then options
after "?" separated by "&"; "query=" must come last, and everything after it
is the SQL, taken verbatim. The query holds the placeholder :user (unquoted)
where the user name goes, which is always sent as a bound parameter, and
returns the hash (bcrypt, argon2id or sha512-crypt) in one column of at most
one row. Options: timeout=SECONDS (default 10); for PostgreSQL also
password_file=PATH (never a password in the URL), sslmode=, sslrootcert=,
sslcert=, sslkey=. SQLite databases are opened read-only. E.g.
sql:sqlite:////var/lib/smtpauth-relay/users.db?query=SELECT password FROM
users WHERE name = :user
sql:postgresql://relay@db.example.org/mail?password_file=/etc/smtpauth-relay/db.pass&query=SELECT
hash FROM mailbox WHERE username = :user AND active
"""


@implementer(ICheckerFactory, IPlugin)
class SQLCheckerFactory:
    """
    A factory for L{smtpauth_relay.sqlchecker.SQLChecker}.
    """

    authType = "sql"
    authHelp = sqlCheckerFactoryHelp
    argStringFormat = (
        "sqlite:////PATH?[timeout=S&]query=SQL or"
        " postgresql://USER@HOST[:PORT]/DB?[password_file=PATH&sslmode=MODE&"
        "timeout=S&]query=SQL, with :user in the SQL"
    )
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str) -> SQLChecker:
        """
        @param argstring: The database URL and options (see
            L{smtpauth_relay.sqlchecker.parseArgument}).

        @return: A checker for that database; it connects at its first check.

        @raise ValueError: If the argument or an option is invalid, naming it.
        """
        from smtpauth_relay.sqlchecker import SQLChecker, parseArgument

        return SQLChecker(parseArgument(argstring))


theSQLCheckerFactory = SQLCheckerFactory()
