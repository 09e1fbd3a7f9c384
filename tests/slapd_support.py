"""
A real OpenLDAP server for L{tests.test_ldap}: C{slapd} on 127.0.0.1 with a
configuration, an mdb database and TLS certificates made in a temporary
directory.

  - C{ldap://} (StartTLS offered) and C{ldaps://} on two free loopback
    ports; the certificate (for C{localhost} and C{127.0.0.1}) is issued by
    a test CA (L{tests.upstream_support.CertificateAuthority}) whose
    certificate is L{Slapd.caPath}.
  - C{dc=example,dc=org} holds OpenLDAP-style users under C{ou=people}
    (C{uid=alice}, ...) and Active-Directory-style ones under C{cn=Users}
    (C{sAMAccountName}, C{userPrincipalName}, from a small test schema), a
    service account C{cn=relay,cn=Users} and two entries sharing the
    C{sAMAccountName} C{twin}; see L{USERS}.
  - Anonymous clients may read C{ou=people} and only bind elsewhere; bound
    ones may read everything but passwords.  Like Active Directory, it
    accepts an unauthenticated bind (a DN with an empty password).

L{sharedSlapd} starts one server for the whole test run (stopped at exit);
L{slapdMissing} says why the server cannot run here (not installed), for
a C{SkipTest}.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import hashlib
import os
import signal
import subprocess
import tempfile
from typing import Any

from tests.e2e_support import HOST, ServerProcess, freePorts

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
MODULE_PATHS = (
    "/usr/lib/ldap",
    "/usr/lib/x86_64-linux-gnu/ldap",
    "/usr/lib64/openldap",
)
SCHEMA_DIRECTORY = "/etc/ldap/schema"

SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
AD_USERS = f"cn=Users,{SUFFIX}"
SERVICE_DN = f"cn=relay,{AD_USERS}"
SERVICE_PASSWORD = "relay-service-secret"

USERS = {
    "alice": "wonderland",
    "bob": "builder",
}
"""OpenLDAP-style users: C{uid=NAME,ou=people,dc=example,dc=org}."""

ADMIN_ALICE_PASSWORD = "admin-alice-secret"
"""The password of C{uid=alice,ou=admins,ou=people,...}: the entry a DN
injection C{alice,ou=admins} would reach."""

AD_USERS_BY_NAME = {
    "carol": ("Carol Jones", "carol-secret"),
    "dave": ("Dave Smith", "dave-secret"),
}
"""Active-Directory-style users: C{cn=FULL NAME,cn=Users,...} with
C{sAMAccountName=NAME} and C{userPrincipalName=NAME@example.org}."""

TWIN_PASSWORD = "twin-secret"
"""Both entries with C{sAMAccountName=twin} have this password."""

_SCHEMA = """\
attributetype ( 1.3.6.1.4.1.99999.1.1 NAME 'sAMAccountName'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.99999.1.2 NAME 'userPrincipalName'
    EQUALITY caseIgnoreMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.99999.2.1 NAME 'testADAccount' AUXILIARY
    MAY ( sAMAccountName $ userPrincipalName ) )
"""


OTHER_HOST = "127.0.0.2"
"""slapd listens for C{ldaps://} here too, with a certificate that does not
name this address."""


def _dieWithParent() -> None:
    """
    In the child, before slapd runs: have the kernel send it SIGTERM if the
    test process dies without stopping it (Linux; elsewhere nothing).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def slapdMissing() -> str | None:
    """
    Why slapd cannot run here, or C{None} if it can.
    """
    for program in (SLAPD, SLAPADD):
        if not os.access(program, os.X_OK):
            return f"{program} is not installed (Debian packages: slapd ldap-utils)"
    if _modulePath() is None:
        return "slapd's back_mdb module was not found in " + ", ".join(MODULE_PATHS)
    return None


def _modulePath() -> str | None:
    for path in MODULE_PATHS:
        if os.path.exists(os.path.join(path, "back_mdb.la")) or os.path.exists(
            os.path.join(path, "back_mdb.so")
        ):
            return path
    return None


def ssha(password: str) -> str:
    """
    C{password} hashed as C{{SSHA}} for C{userPassword}.
    """
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def _entries() -> str:
    blocks = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
        "dc: example\no: Example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=admins,{PEOPLE}\nobjectClass: organizationalUnit\nou: admins\n",
        f"dn: {AD_USERS}\nobjectClass: organizationalRole\ncn: Users\n",
        f"dn: ou=Sales,{SUFFIX}\nobjectClass: organizationalUnit\nou: Sales\n",
    ]
    for name, password in USERS.items():
        blocks.append(
            f"dn: uid={name},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {name}\n"
            f"cn: {name.title()}\nsn: {name.title()}\n"
            f"userPassword: {ssha(password)}\n"
        )
    blocks.append(
        f"dn: uid=alice,ou=admins,{PEOPLE}\nobjectClass: inetOrgPerson\n"
        f"uid: alice\ncn: Alice Admin\nsn: Admin\n"
        f"userPassword: {ssha(ADMIN_ALICE_PASSWORD)}\n"
    )

    def adUser(dn: str, cn: str, account: str, password: str) -> str:
        return (
            f"dn: {dn}\nobjectClass: inetOrgPerson\nobjectClass: testADAccount\n"
            f"cn: {cn}\nsn: {cn.split()[-1]}\nsAMAccountName: {account}\n"
            f"userPrincipalName: {account}@example.org\n"
            f"userPassword: {ssha(password)}\n"
        )

    blocks.append(adUser(SERVICE_DN, "relay", "relay", SERVICE_PASSWORD))
    for account, (cn, password) in AD_USERS_BY_NAME.items():
        blocks.append(adUser(f"cn={cn},{AD_USERS}", cn, account, password))
    blocks.append(adUser(f"cn=Twin One,{AD_USERS}", "Twin One", "twin", TWIN_PASSWORD))
    blocks.append(
        adUser(f"cn=Twin Two,ou=Sales,{SUFFIX}", "Twin Two", "twin", TWIN_PASSWORD)
    )
    return "\n".join(blocks)


class Slapd(ServerProcess):
    """
    One slapd process and its temporary directory.

    @ivar directory: Where its configuration, database, certificates and
        log are.
    @ivar caPath: The CA certificate that issued the server's.
    @ivar ldapPort: The C{ldap://} (StartTLS) port.
    @ivar ldapsPort: The C{ldaps://} port.
    """

    name = "slapd"

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="smtpauth-relay-slapd-")
        self.process: subprocess.Popen[bytes] | None = None
        self.ldapPort = self.ldapsPort = 0
        self.caPath = ""
        self.configPath = os.path.join(self.directory, "slapd.conf")
        self.logPath = os.path.join(self.directory, "slapd.log")

    def _configure(self) -> None:
        from tests.upstream_support import CertificateAuthority

        authority = CertificateAuthority(self.directory, name="slapd test CA")
        self.caPath = authority.certificatePath
        certificate, key = authority.issue(["localhost", HOST], "slapd")
        database = os.path.join(self.directory, "db")
        os.mkdir(database)
        schema = os.path.join(self.directory, "test-ad.schema")
        with open(schema, "w") as f:
            f.write(_SCHEMA)
        config = self.configPath
        includes = "".join(
            f"include {SCHEMA_DIRECTORY}/{name}.schema\n"
            for name in ("core", "cosine", "inetorgperson")
        )
        with open(config, "w") as f:
            f.write(
                includes
                + f"include {schema}\n"
                + f"modulepath {_modulePath()}\n"
                + "moduleload back_mdb\n"
                + f"pidfile {os.path.join(self.directory, 'slapd.pid')}\n"
                + f"TLSCACertificateFile {self.caPath}\n"
                + f"TLSCertificateFile {certificate}\n"
                + f"TLSCertificateKeyFile {key}\n"
                # As Active Directory does: a DN with an empty password is an
                # "unauthenticated bind", and it succeeds.
                + "allow bind_anon_dn\n"
                + "access to attrs=userPassword by anonymous auth by * none\n"
                + f'access to dn.subtree="{PEOPLE}" by * read\n'
                + "access to * by users read by anonymous auth\n"
                + "database mdb\n"
                + f'suffix "{SUFFIX}"\n'
                + f'rootdn "cn=admin,{SUFFIX}"\n'
                + f"directory {database}\n"
                + "maxsize 10485760\n"
            )
        data = os.path.join(self.directory, "data.ldif")
        with open(data, "w") as f:
            f.write(_entries())
        result = subprocess.run(
            [SLAPADD, "-f", config, "-l", data],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"slapadd failed:\n{result.stdout}{result.stderr}")

    def start(self, attempts: int = 3) -> None:
        """
        Configure, load the users, and start slapd on free ports; return
        once both ports accept connections.
        """
        self._configure()
        self._choosePorts()
        super().start(attempts)

    def _portWasTaken(self, log: str) -> bool:
        # With -d 0 slapd says nothing of why it could not listen.
        return True

    def _choosePorts(self) -> None:
        self.ldapPort, self.ldapsPort = freePorts(2)

    def _listeningPorts(self) -> tuple[int, ...]:
        return (self.ldapPort, self.ldapsPort)

    def _command(self) -> list[str]:
        urls = (
            f"ldap://{HOST}:{self.ldapPort}/ ldaps://{HOST}:{self.ldapsPort}/"
            f" ldaps://{OTHER_HOST}:{self.ldapsPort}/"
        )
        return [SLAPD, "-f", self.configPath, "-h", urls, "-d", "0"]

    def _popenArguments(self) -> dict[str, Any]:
        return {"preexec_fn": _dieWithParent}

    def url(self, tls: str = "ldaps", host: str = HOST) -> str:
        """
        The server's URL: C{ldaps://HOST:PORT/} or (for C{"starttls"} and
        C{"none"}) C{ldap://HOST:PORT/}.
        """
        if tls == "ldaps":
            return f"ldaps://{host}:{self.ldapsPort}/"
        return f"ldap://{host}:{self.ldapPort}/"


_shared: Slapd | None = None


def sharedSlapd() -> Slapd:
    """
    The slapd shared by every test in this process: started at the first
    call, stopped and removed when the process exits (or, should it die,
    by the kernel: see L{_dieWithParent}).
    """
    global _shared
    if _shared is None:
        server = Slapd()
        try:
            server.start()
        except BaseException:
            server.remove()
            raise
        atexit.register(server.remove)
        _shared = server
    return _shared
