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

import atexit
import base64
import grp
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from typing import Any

from tests.e2e_support import HOST, START_TIMEOUT, STOP_TIMEOUT, freePorts, poll
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


class DovecotProcess:
    """
    A Dovecot of its own in a temporary directory.

    @ivar users: User names and passwords it accepts.
    @ivar caPath: The PEM certificate of the CA that issued the server's.
    @ivar imapPort: The plaintext port (C{STARTTLS}).
    @ivar imapsPort: The implicit TLS port.
    """

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

    def config(self) -> str:
        with open(self.configPath) as f:
            return f.read()

    def log(self) -> str:
        """
        Dovecot's log and what it wrote to stdout and stderr so far.
        """
        text = []
        for path in (self.outputPath, self.logPath):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text.append(f.read())
            except FileNotFoundError:
                pass
        return "\n".join(text) or "(no log)"

    def start(self, attempts: int = 3) -> None:
        """
        Start C{dovecot -F -c dovecot.conf} and wait until both ports accept
        connections; on a port taken since it was chosen, choose new ones and
        try again (up to C{attempts} times in all).
        """
        for attempt in range(attempts):
            logStart = len(self.log())
            try:
                self._start()
                return
            except AssertionError:
                if attempt + 1 == attempts or (
                    "Address already in use" not in self.log()[logStart:]
                ):
                    raise
            self._choosePorts()

    def _start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        command = [self.executable, "-F", "-c", self.configPath]
        with open(self.outputPath, "ab") as output:
            output.write(f"=== starting: {command}\n".encode())
            output.flush()
            self.process = subprocess.Popen(
                command,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        _servers.add(self)
        try:
            for port in (self.imapPort, self.imapsPort):

                def accepts(port: int = port) -> bool:
                    return self._accepts(port)

                def describe(port: int = port) -> str:
                    return f"Dovecot to listen on {HOST}:{port}\n{self.log()}"

                poll(accepts, START_TIMEOUT, describe)
        except BaseException:
            self.stop()
            raise

    def _accepts(self, port: int) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"Dovecot exited with status {self.process.returncode}:\n"
                f"{self.log()}\n{self.config()}"
            )
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return True
        except OSError:
            return False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """
        SIGTERM (the master stops its children and exits), wait, SIGKILL
        the process group if it does not.
        """
        process = self.process
        _servers.discard(self)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def remove(self) -> None:
        """
        Stop Dovecot and delete its directory.
        """
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


_servers: set[DovecotProcess] = set()


@atexit.register
def _stopServers() -> None:
    """
    Never leave a Dovecot behind, whatever the tests did.
    """
    for server in list(_servers):
        server.remove()


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
