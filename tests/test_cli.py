"""
Tests for L{smtpauth_relay.cli} and L{smtpauth_relay.demo}.
"""

from __future__ import annotations

import io
import os
import stat
import sys

from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay import cli
from smtpauth_relay.config import loadConfig
from smtpauth_relay.demo import DEMO_USER, prepareDemo, twistdCommand
from smtpauth_relay.htpasswd import parseHtpasswd, passwdCommand
from smtpauth_relay.passwords import hashScheme, verifyPassword
from smtpauth_relay.tls import (
    generateSelfSigned,
    loadCertificates,
    serverContextFactory,
)


def run(*argv: str) -> tuple[int, str, str]:
    """
    Run L{cli.main} with C{argv}; return the status, stdout and stderr.
    """
    stdout, stderr = io.StringIO(), io.StringIO()
    status = cli.main(list(argv), stdout, stderr)
    return status, stdout.getvalue(), stderr.getvalue()


class MainTests(SynchronousTestCase):
    """
    Tests for L{cli.main}.
    """

    def test_noArguments(self) -> None:
        """
        Without a command the usage goes to stderr and the status is 2.
        """
        status, out, err = run()
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(err, cli.USAGE)

    def test_help(self) -> None:
        """
        C{help}, C{-h} and C{--help} print the usage to stdout, status 0.
        """
        for flag in ("help", "-h", "--help"):
            self.assertEqual(run(flag), (0, cli.USAGE, ""), flag)

    def test_usageNamesCommands(self) -> None:
        """
        The usage names the three commands and how to run the relay.
        """
        for word in ("check-config", "passwd", "demo", "twistd -n smtpauth-relay"):
            self.assertIn(word, cli.USAGE)

    def test_unknownCommand(self) -> None:
        """
        An unknown command is named on stderr, followed by the usage; status
        2.
        """
        status, out, err = run("frobnicate", "x")
        self.assertEqual((status, out), (2, ""))
        self.assertTrue(
            err.startswith("smtpauth-relay: unknown command 'frobnicate'\n")
        )
        self.assertIn(cli.USAGE, err)

    def test_commands(self) -> None:
        """
        Exactly the documented commands are dispatched.
        """
        self.assertEqual(
            sorted(cli.COMMANDS),
            ["audit", "check-config", "demo", "lockout", "oauth2", "passwd", "queue"],
        )

    def test_oauth2Dispatched(self) -> None:
        """
        C{oauth2} reaches the OAuth2 command: without arguments it prints its
        own usage and exits 2.
        """
        status, out, err = run("oauth2")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("authorize --config", err)


class CheckConfigDispatchTests(SynchronousTestCase):
    """
    C{smtpauth-relay check-config}.
    """

    def writeConfig(self, text: str) -> str:
        path = os.path.abspath(self.mktemp()) + ".toml"
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_valid(self) -> None:
        """
        A valid file gives C{PATH: OK} on stdout and status 0.
        """
        directory = os.path.abspath(self.mktemp())
        path = self.writeConfig(
            "[[listener]]\n"
            'endpoint = "tcp:port=2525"\n'
            'tls = "none"\n'
            "[auth]\n"
            "require_tls = false\n"
            "[delivery]\n"
            f'directory = "{directory}"\n'
        )
        self.assertEqual(run("check-config", path), (0, f"{path}: OK\n", ""))

    def test_invalid(self) -> None:
        """
        An invalid file gives its problems on stderr, naming the file and
        line, and status 1.
        """
        path = self.writeConfig('[server]\nmax_recipients = "many"\n')
        status, out, err = run("check-config", path)
        self.assertEqual((status, out), (1, ""))
        self.assertIn(f"{path}:2: [server] max_recipients:", err)
        self.assertIn("[[listener]]", err)

    def test_missingFile(self) -> None:
        """
        A file that does not exist is a problem, status 1.
        """
        path = os.path.abspath(self.mktemp())
        status, _, err = run("check-config", path)
        self.assertEqual(status, 1)
        self.assertIn(path, err)

    def test_usage(self) -> None:
        """
        No path is a usage error, status 2.
        """
        status, out, err = run("check-config")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("check-config PATH", err)


class PasswdDispatchTests(SynchronousTestCase):
    """
    C{smtpauth-relay passwd}; the password is read from standard input, so
    beyond the usage checks L{passwdCommand} is driven directly.
    """

    def test_usage(self) -> None:
        """
        C{passwd} without a file and user is a usage error, status 2,
        before any password is read.
        """
        status, out, err = run("passwd")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("[--iterations N] FILE USER", err)

    def test_help(self) -> None:
        """
        C{passwd --help} prints the help, status 0.
        """
        status, out, _ = run("passwd", "--help")
        self.assertEqual(status, 0)
        self.assertIn("[--iterations N] FILE USER", out)
        self.assertIn("--scheme scram-sha-256", out)

    def test_setsPassword(self) -> None:
        """
        The password read from a non-terminal stdin is stored as a bcrypt
        hash that verifies, and is never printed.
        """
        path = self.mktemp()
        stdout, stderr = io.StringIO(), io.StringIO()
        status = passwdCommand(
            [path, "alice"],
            io.StringIO("vivid quartz lantern\n"),
            stdout,
            stderr,
            rounds=4,
        )
        self.assertEqual(status, 0)
        self.assertEqual(stderr.getvalue(), "")
        self.assertNotIn("s3cret", stdout.getvalue())
        with open(path, "rb") as f:
            users = parseHtpasswd(f.read(), path)
        self.assertEqual(list(users), ["alice"])
        self.assertEqual(hashScheme(users["alice"]), "bcrypt")
        self.assertTrue(verifyPassword(b"vivid quartz lantern", users["alice"]))


class DemoTests(SynchronousTestCase):
    """
    Tests for L{smtpauth_relay.demo}.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())

    def test_files(self) -> None:
        """
        The demo writes a certificate and key that belong together, a
        password file with the demo user, and a configuration.
        """
        config, password = prepareDemo(self.directory)
        self.assertEqual(config, os.path.join(self.directory, "relay.toml"))
        cert = os.path.join(self.directory, "tls", "cert.pem")
        key = os.path.join(self.directory, "tls", "key.pem")
        self.assertEqual(len(loadCertificates(cert)), 1)
        serverContextFactory(cert, key)
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        self.assertTrue(os.path.isfile(config))
        self.assertGreaterEqual(len(password), 12)

    def test_demoUser(self) -> None:
        """
        The password file has a C{demo:} bcrypt line that verifies against
        the returned password, and no other user.
        """
        _, password = prepareDemo(self.directory)
        path = os.path.join(self.directory, "users")
        with open(path, "rb") as f:
            raw = f.read()
        self.assertTrue(raw.startswith(b"demo:$2"), raw)
        users = parseHtpasswd(raw, path)
        self.assertEqual(list(users), [DEMO_USER])
        self.assertEqual(DEMO_USER, "demo")
        self.assertEqual(hashScheme(users["demo"]), "bcrypt")
        self.assertTrue(verifyPassword(password.encode(), users["demo"]))
        self.assertFalse(verifyPassword(b"wrong", users["demo"]))

    def test_passwordFileMode(self) -> None:
        """
        The file keeping the demo password is readable by its owner only.
        """
        _, password = prepareDemo(self.directory)
        path = os.path.join(self.directory, "demo-password")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            self.assertEqual(f.read(), password + "\n")

    def test_config(self) -> None:
        """
        The configuration is valid: STARTTLS on 127.0.0.1:2587, implicit TLS
        on 127.0.0.1:2465, the demo password file as checker, the spool and a
        Maildir under the demo directory.
        """
        config = loadConfig(prepareDemo(self.directory)[0])
        self.assertEqual(
            [(listener.endpoint, listener.tls) for listener in config.listeners],
            [
                ("tcp:port=2587:interface=127.0.0.1", "starttls"),
                ("tcp:port=2465:interface=127.0.0.1", "implicit"),
            ],
        )
        self.assertEqual(config.server.hostname, "localhost")
        self.assertEqual(
            config.tls.certificate, os.path.join(self.directory, "tls", "cert.pem")
        )
        self.assertEqual(
            config.tls.private_key, os.path.join(self.directory, "tls", "key.pem")
        )
        self.assertEqual(
            config.auth.checkers,
            ("htpasswd:" + os.path.join(self.directory, "users"),),
        )
        self.assertTrue(config.auth.require_tls)
        self.assertEqual(config.relay.trusted_networks, ())
        self.assertEqual(config.queue.directory, os.path.join(self.directory, "spool"))
        self.assertEqual(config.delivery.mode, "maildir")
        self.assertEqual(
            config.delivery.directory, os.path.join(self.directory, "maildir")
        )

    def test_otherPorts(self) -> None:
        """
        Other ports can be asked for.
        """
        config = loadConfig(prepareDemo(self.directory, 3587, 3465)[0])
        self.assertEqual(
            [listener.endpoint for listener in config.listeners],
            [
                "tcp:port=3587:interface=127.0.0.1",
                "tcp:port=3465:interface=127.0.0.1",
            ],
        )

    def test_reused(self) -> None:
        """
        A second run reuses the password and leaves every file as it was.
        """
        config, password = prepareDemo(self.directory)
        names = ("tls/cert.pem", "tls/key.pem", "users", "demo-password", "relay.toml")

        def contents() -> dict[str, bytes]:
            result = {}
            for name in names:
                with open(os.path.join(self.directory, name), "rb") as f:
                    result[name] = f.read()
            return result

        before = contents()
        self.assertEqual(prepareDemo(self.directory), (config, password))
        self.assertEqual(contents(), before)

    def test_relativeDirectory(self) -> None:
        """
        A relative directory is made absolute, so the configuration works
        from anywhere.
        """
        relative = os.path.relpath(self.directory)
        config, _ = prepareDemo(relative)
        self.assertTrue(os.path.isabs(config))
        self.assertEqual(config, os.path.join(self.directory, "relay.toml"))

    def test_existingCertificateKept(self) -> None:
        """
        A certificate already in place (an operator's own) is used, not
        replaced.
        """
        os.makedirs(os.path.join(self.directory, "tls"))
        cert = os.path.join(self.directory, "tls", "cert.pem")
        key = os.path.join(self.directory, "tls", "key.pem")
        generateSelfSigned(cert, key, "mine.example.org")
        with open(cert, "rb") as f:
            before = f.read()
        prepareDemo(self.directory)
        with open(cert, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_quotedDirectory(self) -> None:
        """
        A demo directory whose path holds a double quote or a backslash still
        gives a configuration that loads.
        """
        directory = os.path.join(self.directory, 'my "demo" \\ dir')
        config = loadConfig(prepareDemo(directory)[0])
        self.assertEqual(
            config.auth.checkers, ("htpasswd:" + os.path.join(directory, "users"),)
        )

    def test_usage(self) -> None:
        """
        C{demo} with more than one argument is a usage error, status 2,
        before anything is written or run.
        """
        status, out, err = run("demo", "a", "b")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("demo [DIRECTORY]", err)
        self.assertFalse(os.path.exists("a"))


class TwistdCommandTests(SynchronousTestCase):
    """
    Tests for L{twistdCommand}.
    """

    def test_command(self) -> None:
        """
        The command runs twistd's C{run} under this Python with the arguments
        given, in order.
        """
        command = twistdCommand(["-n", "smtpauth-relay", "--config", "x.toml"])
        self.assertEqual(command[0], sys.executable)
        self.assertEqual(command[1], "-c")
        self.assertEqual(command[3:], ["-n", "smtpauth-relay", "--config", "x.toml"])
        self.assertIn("from twisted.scripts.twistd import run", command[2])
        compile(command[2], "<twistdCommand>", "exec")

    def test_noArguments(self) -> None:
        """
        Without arguments only the interpreter and bootstrap are given.
        """
        self.assertEqual(len(twistdCommand([])), 3)
