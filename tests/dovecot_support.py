"""
A real IMAP server for L{tests.test_imap}: Dovecot (Debian's
C{dovecot-imapd}) started by the tests on free 127.0.0.1 ports, from a
configuration and a directory of its own.

  - C{imap} on L{DovecotProcess.imapPort} (plaintext, C{STARTTLS} offered)
    and C{imaps} on L{DovecotProcess.imapsPort} (implicit TLS), with
    C{ssl = required}; its certificate, for C{localhost} only, is issued by
    a test CA (L{tests.upstream_support.CertificateAuthority}) whose
    certificate is L{DovecotProcess.caPath}.
  - Users and passwords from a C{passwd-file} (SHA256 hashes, so any
    password, with any character, can be written into it); C{auth_username_chars}
    is empty, so user names may be UTF-8.
  - No delay after a failed login and no per-address auth penalty, so the
    wrong-password tests stay fast.
  - Run as root in the foreground (C{dovecot -F}); C{base_dir},
    C{state_dir}, the log and the mail directories are all in the
    temporary directory, removed by L{DovecotProcess.remove}.

The configuration is Dovecot 2.3's (Debian 12); L{skipReason} says why the
tests cannot run here (no Dovecot, another major version, not root).
"""

from __future__ import annotations

import base64
import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from typing import Any

from tests.e2e_support import HOST, ServerProcess, freePorts
from tests.upstream_support import CertificateAuthority

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
SERVER_NAME = "localhost"
"""The only name in the server's certificate."""

LOGIN_USER = "dovenull"
INTERNAL_USER = "dovecot"
MAIL_USER = "nobody"


def dovecotVersion(executable: str = DOVECOT) -> str | None:
    """
    C{dovecot --version}'s first word, or C{None} if it cannot be run.
    """
    try:
        output = subprocess.run(
            [executable, "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    words = output.split()
    return words[0] if words else None


def _skipReason() -> str | None:
    if not os.path.exists(DOVECOT):
        return (
            "Dovecot is not installed"
            " (apt-get install dovecot-imapd); the IMAP tests need a real server"
        )
    version = dovecotVersion()
    if version is None:
        return f"{DOVECOT} --version failed"
    if not version.startswith("2.3."):
        return f"Dovecot {version}: the test configuration is written for 2.3"
    if os.geteuid() != 0:
        return "Dovecot is started as root by the tests; not root"
    for user in (LOGIN_USER, INTERNAL_USER, MAIL_USER):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no {user!r} user for Dovecot"
    return None


skipReason = _skipReason()
"""Why Dovecot cannot be used here, or C{None}."""


def passwdLine(user: str, password: str) -> str:
    """
    A C{passwd-file} line for C{user} with a C{{SHA256}} hash of
    C{password} (UTF-8): safe whatever characters the password holds.
    """
    digest = hashlib.sha256(password.encode("utf-8")).digest()
    return f"{user}:{{SHA256}}{base64.b64encode(digest).decode('ascii')}\n"


class DovecotProcess(ServerProcess):
    """
    A Dovecot of its own in a temporary directory.

    @ivar users: User names and passwords it accepts.
    @ivar caPath: The PEM certificate of the CA that issued the server's.
    @ivar imapPort: The plaintext port (C{STARTTLS}).
    @ivar imapsPort: The implicit TLS port.
    """

    name = "Dovecot"

    def __init__(self, users: dict[str, str], executable: str = DOVECOT) -> None:
        self.users = dict(users)
        self.executable = executable
        self.directory = tempfile.mkdtemp(prefix="dovecot-test-")
        # Dovecot's unprivileged processes (auth as "dovecot", mail as
        # "nobody") must be able to traverse it.
        os.chmod(self.directory, 0o755)
        self.configPath = os.path.join(self.directory, "dovecot.conf")
        self.logPath = os.path.join(self.directory, "dovecot.log")
        self.outputPath = os.path.join(self.directory, "output.log")
        self.passwdPath = os.path.join(self.directory, "passwd")
        self.mailDirectory = os.path.join(self.directory, "mail")
        self.baseDirectory = os.path.join(self.directory, "run")
        self.ca = CertificateAuthority(self.directory, name="dovecot test CA")
        self.caPath = self.ca.certificatePath
        self.certificatePath, self.keyPath = self.ca.issue([SERVER_NAME], "imap")
        os.mkdir(self.mailDirectory)
        mailUser = pwd.getpwnam(MAIL_USER)
        os.chown(self.mailDirectory, mailUser.pw_uid, mailUser.pw_gid)
        with open(self.passwdPath, "w", encoding="utf-8") as f:
            for user, password in self.users.items():
                f.write(passwdLine(user, password))
        os.chmod(self.passwdPath, 0o644)
        self.process: subprocess.Popen[bytes] | None = None
        self.imapPort = self.imapsPort = 0
        self._choosePorts()

    def _choosePorts(self) -> None:
        self.imapPort, self.imapsPort = freePorts(2)
        self._writeConfig()

    def _writeConfig(self) -> None:
        mailUser = pwd.getpwnam(MAIL_USER)
        mailGroup = grp.getgrgid(mailUser.pw_gid).gr_name
        d = self.directory
        config = f"""\
# Written by tests/dovecot_support.py
base_dir = {self.baseDirectory}
state_dir = {d}/state
log_path = {self.logPath}
info_log_path = {self.logPath}
protocols = imap
listen = {HOST}
ssl = required
ssl_cert = <{self.certificatePath}
ssl_key = <{self.keyPath}
disable_plaintext_auth = yes
auth_mechanisms = plain login
auth_failure_delay = 0
auth_username_chars =
default_login_user = {LOGIN_USER}
default_internal_user = {INTERNAL_USER}
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = {self.passwdPath}
}}
userdb {{
  driver = static
  args = uid={MAIL_USER} gid={mailGroup} home={self.mailDirectory}/%u
}}
mail_location = maildir:~/Maildir
service imap-login {{
  inet_listener imap {{
    address = {HOST}
    port = {self.imapPort}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {self.imapsPort}
    ssl = yes
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""
        with open(self.configPath, "w") as f:
            f.write(config)

    def _logFiles(self) -> tuple[str, ...]:
        return (self.outputPath, self.logPath)

    def _listeningPorts(self) -> tuple[int, ...]:
        return (self.imapPort, self.imapsPort)

    def _command(self) -> list[str]:
        return [self.executable, "-F", "-c", self.configPath]


class SharedDovecotMixin:
    """
    One Dovecot for all the tests of a class: started by the first test
    that runs, stopped after the last (and at exit, whatever happens).

    Mixed into a trial test case, which sets C{dovecotUsers}; each test
    finds the server in C{self.dovecot}.
    """

    dovecotUsers: dict[str, str] = {}
    dovecot: DovecotProcess

    _shared: DovecotProcess | None = None
    _startError: BaseException | None = None
    _remaining: set[str] = set()

    def setUpDovecot(self) -> None:
        """
        Call from C{setUp}.
        """
        test: Any = self
        cls = type(self)
        if cls._startError is not None:
            raise AssertionError(f"Dovecot did not start: {cls._startError}")
        if cls._shared is None:
            server = DovecotProcess(cls.dovecotUsers)
            try:
                server.start()
            except BaseException as e:
                cls._startError = e
                server.remove()
                raise
            cls._shared = server
            cls._remaining = {n for n in dir(cls) if n.startswith("test_")}
        self.dovecot = cls._shared
        test.addCleanup(self._dovecotFinished)

    def _dovecotFinished(self) -> None:
        test: Any = self
        cls = type(self)
        cls._remaining.discard(test._testMethodName)
        server = cls._shared
        if server is None:
            return
        if not server.running():
            cls._shared = None
            server.remove()
            raise AssertionError(f"Dovecot died:\n{server.log()}")
        if not cls._remaining:
            cls._shared = None
            server.remove()
