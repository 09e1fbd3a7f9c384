"""
Helpers for L{tests.test_e2e}: a real relay in a subprocess, and a small SMTP
client over raw sockets for what smtplib is too polite to send.

Nothing here imports the reactor: the relay runs in another process and the
tests talk to it with blocking sockets.
"""

from __future__ import annotations

import atexit
import base64
import itertools
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from twisted.trial.unittest import FailTest, SynchronousTestCase

from smtpauth_relay.demo import twistdCommand
from smtpauth_relay.htpasswd import setUser
from smtpauth_relay.passwords import hashPassword
from smtpauth_relay.tls import generateSelfSigned

T = TypeVar("T")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The source tree holding C{twisted/plugins/smtpauth_relay_plugin.py}."""

HOST = "127.0.0.1"
HOSTNAME = "relay-e2e.test"
"""The relay's C{[server] hostname}: in the greeting and C{Received: by}."""
CLIENT_NAME = "client.e2e.test"
"""What the tests say in EHLO (and what keeps smtplib from calling getfqdn)."""
USER = "alice"
PASSWORD = "correct horse battery staple"
OTHER_USER = "bob"
OTHER_PASSWORD = "another secret"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
DELIVERY_TIMEOUT = 15.0
POLL_INTERVAL = 0.05
IO_TIMEOUT = 10.0


def poll(
    check: Callable[[], T | None],
    timeout: float,
    describe: Callable[[], str],
    interval: float = POLL_INTERVAL,
) -> T:
    """
    Call C{check} until it returns something other than C{None} (or
    C{False}), or fail the test (L{FailTest}) with C{describe()} once
    C{timeout} seconds are up.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise FailTest(f"gave up after {timeout}s waiting: {describe()}")
        time.sleep(interval)


def freePorts(count: int) -> list[int]:
    """
    C{count} distinct TCP ports on 127.0.0.1 that were free a moment ago
    (bound to port 0 together, then closed).
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def acceptsConnections(port: int, host: str = HOST) -> bool:
    """
    Whether something accepts TCP connections on C{host:port} now.
    """
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def stopProcess(
    process: subprocess.Popen[bytes] | None,
    stopSignal: int = signal.SIGTERM,
    timeout: float = STOP_TIMEOUT,
) -> None:
    """
    Send C{process} C{stopSignal} and wait for it to exit; SIGKILL it if it
    has not within C{timeout} seconds.  Nothing if there is no process or
    it has exited already.
    """
    if process is None or process.poll() is not None:
        return
    process.send_signal(stopSignal)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


class ServerProcess(ABC):
    """
    A server the tests run in a subprocess, from a configuration and a
    temporary directory of its own, listening on ports chosen free.

    A subclass says how to run it (L{_command}, L{_popenArguments}), which
    ports to wait for (L{_listeningPorts}) and how to choose new ones
    (L{_choosePorts}); it sets C{directory}, C{configPath}, C{logPath} and
    C{process} (C{None} until started).

    @cvar name: What failures call the server.
    @cvar portTaken: What it logs when a port it should listen on is taken.
    """

    name: ClassVar[str] = "server"
    portTaken: ClassVar[str] = "Address already in use"

    directory: str
    configPath: str
    logPath: str
    process: subprocess.Popen[bytes] | None

    @abstractmethod
    def _command(self) -> list[str]:
        """
        The server's argv.
        """

    def _popenArguments(self) -> dict[str, Any]:
        """
        More keyword arguments for L{subprocess.Popen}.
        """
        return {}

    @abstractmethod
    def _listeningPorts(self) -> Iterable[int]:
        """
        The ports that must accept connections before the server counts as
        started.
        """

    @abstractmethod
    def _choosePorts(self) -> None:
        """
        Choose new free ports (and write them into the configuration).
        """

    def _logFiles(self) -> tuple[str, ...]:
        """
        The files the server writes to; the first gets its stdout and
        stderr.
        """
        return (self.logPath,)

    def config(self) -> str:
        with open(self.configPath) as f:
            return f.read()

    def log(self) -> str:
        """
        Everything the server wrote (to stdout, stderr and its log) so far.
        """
        text = []
        for path in self._logFiles():
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text.append(f.read())
            except FileNotFoundError:
                pass
        return "\n".join(text) or "(no log)"

    def start(self, attempts: int = 3) -> None:
        """
        Start the server and wait until every port it listens on accepts
        connections.  Should another process have taken one of the ports
        since they were chosen, choose new ones and try again (up to
        C{attempts} times in all).
        """
        for attempt in range(attempts):
            logStart = len(self.log())
            try:
                self._start()
                return
            except AssertionError:
                if attempt + 1 == attempts or not self._portWasTaken(
                    self.log()[logStart:]
                ):
                    raise
            self._choosePorts()

    def _portWasTaken(self, log: str) -> bool:
        """
        Whether C{log}, what the server wrote as it failed to start, says
        that a port was taken.
        """
        return self.portTaken in log

    def _start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        command = self._command()
        with open(self._logFiles()[0], "ab") as output:
            output.write(f"=== starting: {command}\n".encode())
            output.flush()
            self.process = subprocess.Popen(
                command,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                **self._popenArguments(),
            )
        _running.add(self)
        try:
            for port in self._listeningPorts():

                def accepts(port: int = port) -> bool:
                    return self._accepts(port)

                def describe(port: int = port) -> str:
                    return f"{self.name} to listen on {HOST}:{port}\n{self.log()}"

                poll(accepts, START_TIMEOUT, describe)
        except BaseException:
            self.stop()
            raise

    def _accepts(self, port: int) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with status {self.process.returncode} "
                f"before listening on {port}:\n{self.log()}\n{self.config()}"
            )
        return acceptsConnections(port)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """
        SIGTERM, wait, SIGKILL if it does not exit.
        """
        _running.discard(self)
        stopProcess(self.process)

    def remove(self) -> None:
        """
        Stop the server and delete its directory.
        """
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


_running: set[ServerProcess] = set()


@atexit.register
def _stopAll() -> None:
    """
    Never leave a server behind, whatever the tests did.
    """
    for server in list(_running):
        server.remove()


def clientContext(
    minimum: ssl.TLSVersion | None = None, maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """
    A client TLS context that accepts the relay's self-signed certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    return context


def tlsClientHello() -> bytes:
    """
    The first flight of a real TLS handshake (a ClientHello record), as a
    client would send it to a port it wrongly believes speaks TLS.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = clientContext().wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def toml(value: object) -> str:
    """
    A Python value as a TOML value (strings, numbers, booleans, lists).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


@dataclass(eq=False)
class RelayProcess(ServerProcess):
    """
    One relay: its files in a temporary directory and its C{twistd}
    process.

    @ivar server: extra C{[server]} keys.
    @ivar tls: extra C{[tls]} keys.
    @ivar queue: extra C{[queue]} keys (besides C{directory}).
    @ivar delivery: the C{[delivery]} keys; without a C{mode} the relay
        delivers into its own Maildir (L{maildir}), with one (say
        C{"smarthost"}) exactly these keys are written.
    @ivar lockout: C{[auth.lockout]} keys; the section is written only when
        there are some.
    @ivar relay: extra C{[relay]} keys (besides C{trusted_networks}).
    @ivar senderLoginMap: the contents of a sender login map, written to
        L{senderLoginMapPath} and named by C{[relay] sender_login_map}; with
        C{None}, no map.
    @ivar listener: extra keys written in every C{[[listener]]} (say
        C{proxy_protocol} and C{trusted_proxies}).
    @ivar endpoints: C{(endpoint, tls)} of each listener, replacing the
        usual three TCP ones; L{start} then waits for no port (use
        C{NOTIFY_SOCKET} to know when the relay is ready).
    @ivar sections: extra sections, by name, with their keys.
    @ivar env: extra environment variables for the relay.
    @ivar inheritFds: descriptors handed to the relay as 3, 4, ... with
        C{LISTEN_FDS}, C{LISTEN_PID} (and C{LISTEN_FDNAMES} if
        C{fdNames}), as systemd's socket activation does.
    @ivar fdNames: the names of C{inheritFds}.
    @ivar perListener: extra keys for the listener of one TLS mode
        (C{"starttls"}, C{"implicit"}, C{"none"}).
    """

    server: dict[str, object] = field(default_factory=dict)
    tls: dict[str, object] = field(default_factory=dict)
    queue: dict[str, object] = field(default_factory=dict)
    delivery: dict[str, object] = field(default_factory=dict)
    directory: str = ""
    process: subprocess.Popen[bytes] | None = None
    lockout: dict[str, object] = field(default_factory=dict)
    relay: dict[str, object] = field(default_factory=dict)
    senderLoginMap: str | None = None
    listener: dict[str, object] = field(default_factory=dict)
    endpoints: list[tuple[str, str]] | None = None
    sections: dict[str, dict[str, object]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    inheritFds: tuple[int, ...] = ()
    fdNames: tuple[str, ...] = ()
    perListener: dict[str, dict[str, object]] = field(default_factory=dict)

    name: ClassVar[str] = "relay"

    def __post_init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="smtpauth-e2e-")
        self.starttlsPort, self.implicitPort, self.plainPort = freePorts(3)
        self.queueDirectory = os.path.join(self.directory, "queue")
        self.maildir = os.path.join(self.directory, "maildir")
        self.configPath = os.path.join(self.directory, "relay.toml")
        self.logPath = os.path.join(self.directory, "relay.log")
        d = self.directory
        self.certificate = os.path.join(d, "cert.pem")
        self.privateKey = os.path.join(d, "key.pem")
        generateSelfSigned(self.certificate, self.privateKey, HOSTNAME)
        self.users = os.path.join(d, "users")
        setUser(self.users, USER, hashPassword(PASSWORD.encode(), rounds=4))
        setUser(self.users, OTHER_USER, hashPassword(OTHER_PASSWORD.encode(), rounds=4))
        self.senderLoginMapPath = os.path.join(d, "senders")
        if self.senderLoginMap is not None:
            with open(self.senderLoginMapPath, "w", encoding="utf-8") as f:
                f.write(self.senderLoginMap)
        self._writeConfig()

    def _writeConfig(self) -> None:
        cert, key, users = self.certificate, self.privateKey, self.users
        server = {"hostname": HOSTNAME, "reverse_dns": False, **self.server}
        tls = {"certificate": cert, "private_key": key, **self.tls}
        lines = ["[server]"]
        lines += [f"{k} = {toml(v)}" for k, v in server.items()]
        lines += ["", "[tls]"]
        lines += [f"{k} = {toml(v)}" for k, v in tls.items()]
        endpoints = self.endpoints
        if endpoints is None:
            endpoints = [
                (f"tcp:port={port}:interface={HOST}", mode)
                for port, mode in (
                    (self.starttlsPort, "starttls"),
                    (self.implicitPort, "implicit"),
                    (self.plainPort, "none"),
                )
            ]
        for endpoint, mode in endpoints:
            lines += [
                "",
                "[[listener]]",
                f"endpoint = {toml(endpoint)}",
                f"tls = {toml(mode)}",
            ]
            extra = {**self.listener, **self.perListener.get(mode, {})}
            lines += [f"{k} = {toml(v)}" for k, v in extra.items()]
        lines += [
            "",
            "[auth]",
            f"checkers = {toml(['htpasswd:' + users])}",
        ]
        if self.lockout:
            lines += ["", "[auth.lockout]"]
            lines += [f"{k} = {toml(v)}" for k, v in self.lockout.items()]
        relay = dict(self.relay)
        if self.senderLoginMap is not None:
            relay.setdefault("sender_login_map", self.senderLoginMapPath)
        relay.setdefault("trusted_networks", [])
        lines += ["", "[relay]"]
        lines += [f"{k} = {toml(v)}" for k, v in relay.items()]
        lines += [
            "",
            "[queue]",
            f"directory = {toml(self.queueDirectory)}",
        ]
        lines += [f"{k} = {toml(v)}" for k, v in self.queue.items()]
        delivery = (
            self.delivery
            if "mode" in self.delivery
            else {"mode": "maildir", "directory": self.maildir, **self.delivery}
        )
        lines += ["", "[delivery]"]
        lines += [f"{k} = {toml(v)}" for k, v in delivery.items()]
        for name, keys in self.sections.items():
            lines += ["", f"[{name}]"]
            lines += [f"{k} = {toml(v)}" for k, v in keys.items()]
        with open(self.configPath, "w") as f:
            f.write("\n".join(lines) + "\n")

    @property
    def ports(self) -> tuple[int, ...]:
        if self.endpoints is not None:
            return ()
        return (self.starttlsPort, self.implicitPort, self.plainPort)

    def _listeningPorts(self) -> tuple[int, ...]:
        return self.ports

    def _choosePorts(self) -> None:
        self.starttlsPort, self.implicitPort, self.plainPort = freePorts(3)
        self._writeConfig()

    def _command(self) -> list[str]:
        command = twistdCommand(
            ["-n", "--pidfile=", "smtpauth-relay", "--config", self.configPath]
        )
        if self.inheritFds:
            # As systemd does: the sockets become 3, 4, ... and LISTEN_PID
            # names the process that runs the relay (the launcher execs it).
            assert min(self.inheritFds) >= 3 + len(self.inheritFds), self.inheritFds
            command = [
                sys.executable,
                "-c",
                _SOCKET_ACTIVATION_LAUNCHER,
                ",".join(str(fd) for fd in self.inheritFds),
                *command,
            ]
        return command

    def _popenArguments(self) -> dict[str, Any]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p
        )
        env.update(self.env)
        if self.inheritFds:
            env["LISTEN_FDS"] = str(len(self.inheritFds))
            if self.fdNames:
                env["LISTEN_FDNAMES"] = ":".join(self.fdNames)
        return {"env": env, "pass_fds": self.inheritFds}

    def kill9(self) -> None:
        """
        C{kill -9} the relay: no shutdown code runs.
        """
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(STOP_TIMEOUT)
        _running.discard(self)

    # -- the spool and the Maildir --------------------------------------

    def spoolFiles(self) -> list[str]:
        """
        Every file in the spool's C{tmp/} and C{queued/}.
        """
        names = []
        for sub in ("tmp", "queued"):
            path = os.path.join(self.queueDirectory, sub)
            try:
                names += [os.path.join(sub, n) for n in os.listdir(path)]
            except FileNotFoundError:
                pass
        return sorted(names)

    def maildirFiles(self) -> dict[str, bytes]:
        """
        The files in the Maildir's C{new/}, by name.
        """
        new = os.path.join(self.maildir, "new")
        result = {}
        try:
            names = os.listdir(new)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        for name in names:
            try:
                with open(os.path.join(new, name), "rb") as f:
                    result[name] = f.read()
            except FileNotFoundError:
                pass
        return result

    def delivered(self, marker: bytes) -> list[bytes]:
        """
        The delivered messages that contain C{marker}.
        """
        return [data for data in self.maildirFiles().values() if marker in data]

    def waitForDelivery(self, marker: bytes) -> bytes:
        """
        Wait for the one message containing C{marker} to be in C{new/}.
        """

        def check() -> bytes | None:
            found = self.delivered(marker)
            if len(found) > 1:
                raise AssertionError(f"{marker!r} delivered {len(found)} times")
            return found[0] if found else None

        return poll(
            check,
            DELIVERY_TIMEOUT,
            lambda: (
                f"a message with {marker!r} in {self.maildir}/new; "
                f"spool: {self.spoolFiles()}\n{self.log()}"
            ),
        )

    def envelopes(self) -> dict[str, dict[str, Any]]:
        """
        The JSON envelopes in C{queued/}, by queue id (envelopes are
        replaced by rename, so each one read is whole).
        """
        queued = os.path.join(self.queueDirectory, "queued")
        result = {}
        try:
            names = os.listdir(queued)
        except FileNotFoundError:
            return {}
        for name in names:
            if not name.endswith(".env"):
                continue
            try:
                with open(os.path.join(queued, name), "rb") as f:
                    result[name[: -len(".env")]] = json.load(f)
            except FileNotFoundError:
                pass
        return result

    def waitForEmptySpool(self, timeout: float = DELIVERY_TIMEOUT) -> None:
        """
        Wait (up to C{timeout} seconds) until nothing is left in the spool
        (written, queued or being thrown away).
        """
        poll(
            lambda: not self.spoolFiles(),
            timeout,
            lambda: f"an empty spool, still: {self.spoolFiles()}\n{self.log()}",
        )


_SOCKET_ACTIVATION_LAUNCHER = """
import os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)
for fd in fds:
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class SharedRelayTestCase(SynchronousTestCase):
    """
    Base for test classes that share one relay: started by the first test
    of the class, stopped after the last (and at exit, whatever happens).

    @cvar relayServer: extra C{[server]} keys of the relay.
    @cvar relayTLS: extra C{[tls]} keys of the relay.
    """

    relayServer: dict[str, object] = {}
    relayTLS: dict[str, object] = {}
    _sharedRelay: RelayProcess | None = None
    _startError: BaseException | None = None
    _remaining: set[str] = set()

    relay: RelayProcess

    def setUp(self) -> None:
        cls = type(self)
        if cls.__dict__.get("_startError") is not None:
            raise AssertionError(f"the relay did not start: {cls._startError}")
        if cls.__dict__.get("_sharedRelay") is None:
            relay = cls.makeRelay()
            try:
                relay.start()
            except BaseException as e:
                cls._startError = e
                relay.remove()
                raise
            cls._sharedRelay = relay
            cls._remaining = {n for n in dir(cls) if n.startswith("test_")}
        shared = cls._sharedRelay
        assert shared is not None
        self.relay = shared
        self.addCleanup(self._finished)

    def _finished(self) -> None:
        cls = type(self)
        cls._remaining.discard(self._testMethodName)
        relay = cls.__dict__.get("_sharedRelay")
        if relay is not None and relay.process is not None:
            if relay.process.poll() is not None:
                raise AssertionError(
                    f"the relay died with status {relay.process.returncode}:\n"
                    + relay.log()
                )
        if not cls._remaining and relay is not None:
            cls._sharedRelay = None
            relay.remove()

    @classmethod
    def makeRelay(cls) -> RelayProcess:
        """
        The relay the class shares, not started yet.
        """
        return RelayProcess(server=dict(cls.relayServer), tls=dict(cls.relayTLS))


def loopbackAddresses(second: int, start: int = 2) -> Callable[[], str]:
    """
    A function that gives, at each call, a loopback address
    C{127.SECOND.x.y} it has not given before (the C{start}th on), so that
    the relay's per-address limits and lockouts never see two tests as one
    client.  Each module takes its own C{SECOND}.
    """
    numbers = itertools.count(start)

    def nextSourceAddress() -> str:
        n = next(numbers)
        return f"127.{second}.{n // 250}.{n % 250 + 1}"

    return nextSourceAddress


def b64(data: str | bytes) -> str:
    """
    C{data} (UTF-8 if text) in base64, as AUTH responses are sent.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def plainResponse(user: str, password: str, authzid: str = "") -> str:
    """
    The C{AUTH PLAIN} response for C{user} and C{password}.
    """
    return b64(f"{authzid}\0{user}\0{password}")


def closeQuietly(client: smtplib.SMTP) -> None:
    """
    Close an smtplib client, whatever state its connection is in.
    """
    try:
        client.close()
    except OSError:
        pass


QUEUED = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)\Z")
"""The relay's reply to the end of a message it accepted; the queue ID."""


class ConnectionClosed(Exception):
    """
    The relay closed the connection while a reply was expected.
    """


@dataclass(frozen=True)
class SMTPReply:
    """
    One reply: its code and its lines (without the code and separator).
    """

    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str:
        """
        The enhanced status code of the last line, or C{""}.
        """
        first = self.lines[-1].split(" ", 1)[0] if self.lines else ""
        return first if first[:1].isdigit() and first.count(".") == 2 else ""

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class RawSMTP:
    """
    An SMTP client that sends exactly the bytes it is given and parses
    replies; for pipelining, smuggling and other impolite input.
    """

    def __init__(
        self,
        port: int,
        implicitTLS: bool = False,
        context: ssl.SSLContext | None = None,
        sourceAddress: str | None = None,
        timeout: float = IO_TIMEOUT,
    ) -> None:
        source = (sourceAddress, 0) if sourceAddress else None
        self.sock: socket.socket = socket.create_connection(
            (HOST, port), timeout=timeout, source_address=source
        )
        self._buffer = b""
        if implicitTLS:
            self.sock = (context or clientContext()).wrap_socket(self.sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionClosed(f"connection closed; unparsed: {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> SMTPReply:
        """
        Read one (possibly multi-line) reply.
        """
        lines = []
        while True:
            line = self._line()
            if len(line) < 3 or not line[:3].isdigit():
                raise AssertionError(f"not an SMTP reply line: {line!r}")
            lines.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return SMTPReply(int(line[:3]), tuple(lines))

    def command(self, line: str | bytes) -> SMTPReply:
        """
        Send one command line (CRLF added) and read its reply.
        """
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + b"\r\n")
        return self.reply()

    def startTLS(self, context: ssl.SSLContext | None = None) -> None:
        """
        Do the TLS handshake on the connection as it is now (after a 220 to
        STARTTLS); anything still unread is an error.
        """
        if self._buffer:
            raise AssertionError(f"data before the TLS handshake: {self._buffer!r}")
        self.sock = (context or clientContext()).wrap_socket(self.sock)

    def readUntilClosed(self) -> list[SMTPReply]:
        """
        Every reply until the relay closes the connection.
        """
        result = []
        while True:
            try:
                result.append(self.reply())
            except ConnectionClosed:
                if self._buffer:
                    raise
                return result

    def closedWithoutReply(self) -> bool:
        """
        Whether the relay closes the connection without sending any more.
        """
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return not self._buffer
                self._buffer += chunk
        except ConnectionResetError:
            return not self._buffer


# -- a real HAProxy in front of the relay -----------------------------------------

HAPROXY = "/usr/sbin/haproxy"
"""Debian's HAProxy (C{apt-get install haproxy})."""


@dataclass(frozen=True)
class ProxyRoute:
    """
    One HAProxy frontend and the relay port it forwards to.

    @ivar target: the relay's port.
    @ivar version: the PROXY protocol version HAProxy sends (1: C{send-proxy},
        2: C{send-proxy-v2}).
    """

    target: int
    version: int


class HAProxyProcess(ServerProcess):
    """
    A real HAProxy in TCP mode, in the foreground (C{-db}): one frontend on
    127.0.0.1 per route, each forwarding to the relay from 127.0.0.1 with
    a PROXY header of the route's version.

    @ivar ports: the frontend port of each route, by name.
    """

    name = "HAProxy"
    portTaken = "cannot bind socket"

    def __init__(self, routes: dict[str, ProxyRoute], executable: str = HAPROXY):
        self.routes = dict(routes)
        self.executable = executable
        self.directory = tempfile.mkdtemp(prefix="haproxy-e2e-")
        self.configPath = os.path.join(self.directory, "haproxy.cfg")
        self.logPath = os.path.join(self.directory, "haproxy.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self._choosePorts()

    def _choosePorts(self) -> None:
        self.ports = dict(zip(self.routes, freePorts(len(self.routes)), strict=True))
        self._writeConfig()

    def _writeConfig(self) -> None:
        lines = [
            "global",
            "    maxconn 256",
            "",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 60s",
            "    timeout server 60s",
        ]
        for name, route in self.routes.items():
            option = "send-proxy" if route.version == 1 else "send-proxy-v2"
            lines += [
                "",
                f"frontend fe_{name}",
                f"    bind {HOST}:{self.ports[name]}",
                f"    default_backend be_{name}",
                "",
                f"backend be_{name}",
                f"    server relay {HOST}:{route.target} {option} source {HOST}",
            ]
        with open(self.configPath, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _listeningPorts(self) -> Iterable[int]:
        return self.ports.values()

    def _command(self) -> list[str]:
        return [self.executable, "-f", self.configPath, "-db"]


def queueCommand(relay: RelayProcess, *args: str) -> tuple[int, str]:
    """
    Run C{smtpauth-relay queue -c CONFIG ARGS} as a separate process.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p
    )
    result = subprocess.run(
        [sys.executable, "-m", "smtpauth_relay.cli", "queue", "-c", relay.configPath]
        + list(args),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, result.stdout + result.stderr


def markedMessage(marker: str, body: bytes) -> bytes:
    """
    A small message (CRLF line ends) with C{marker} as its Subject and in
    its Message-ID, so a test can find it wherever it was delivered.
    """
    return (
        b"From: Sender <sender@sender.example>\r\n"
        b"To: Recipient <rcpt@rcpt.example>\r\n"
        b"Subject: " + marker.encode() + b"\r\n"
        b"Message-ID: <" + marker.encode() + b"@client.e2e.test>\r\n"
        b"\r\n" + body
    )
