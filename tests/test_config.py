"""
Tests for L{smtpauth_relay.config}.
"""

import datetime
import io
import ipaddress
import os
import re
import socket

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.config import (
    AuthConfig,
    Config,
    DeliveryConfig,
    ListenerConfig,
    QueueConfig,
    RelayConfig,
    ServerConfig,
    TLSConfig,
    checkConfigCommand,
    loadConfig,
    parseConfig,
)
from smtpauth_relay.errors import ConfigError

# Sections that make a document valid, appended by complete() when the text
# under test does not have its own.
BASE_SECTIONS = {
    "listener": '[[listener]]\nendpoint = "tcp:port=2525"\ntls = "none"\n',
    "auth": "[auth]\nrequire_tls = false\n",
    "delivery": '[delivery]\ndirectory = "/srv/mail"\n',
}

SERVER_KEYS = (
    "hostname",
    "max_message_size",
    "max_recipients",
    "max_connections",
    "max_connections_per_ip",
    "idle_timeout",
    "max_line_length",
    "reverse_dns",
)


def complete(text: str) -> str:
    """
    @param text: Part of a configuration; its lines keep their numbers.
    @return: C{text} followed by whichever of L{BASE_SECTIONS} it lacks.
    """
    parts = [text]
    for name, body in BASE_SECTIONS.items():
        if not re.search(rf"^\s*(\[+{name}\]+|{name}\s*=)", text, re.MULTILINE):
            parts.append(body)
    return "\n".join(parts)


def writeCertificate(
    directory: str, name: str = "relay", passphrase: bytes | None = None
) -> tuple[str, str]:
    """
    Write a self-signed certificate and its key as PEM files.

    @param directory: Where to write them.
    @param name: The files are C{name.crt} and C{name.key}.
    @param passphrase: If given, the key is encrypted with it.
    @return: The certificate's path and the key's path.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    encryption: serialization.KeySerializationEncryption
    if passphrase is None:
        encryption = serialization.NoEncryption()
    else:
        encryption = serialization.BestAvailableEncryption(passphrase)
    certificatePath = os.path.join(directory, name + ".crt")
    keyPath = os.path.join(directory, name + ".key")
    with open(certificatePath, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(keyPath, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                encryption,
            )
        )
    return certificatePath, keyPath


class ConfigTestCase(SynchronousTestCase):
    """
    Helpers for tests of configuration documents.
    """

    def problemsOf(self, text: str, path: str = "relay.toml") -> list[str]:
        """
        @return: The problems L{parseConfig} reports for C{text}.
        """
        error = self.assertRaises(ConfigError, parseConfig, text, path)
        return error.problems

    def makeDirectory(self) -> str:
        """
        @return: The absolute path of a new, empty directory.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        return directory

    def writeConfig(self, directory: str, text: str) -> str:
        """
        @return: The path of a new C{relay.toml} holding C{text}.
        """
        path = os.path.join(directory, "relay.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


class ValidConfigTests(ConfigTestCase):
    """
    Valid documents load into the dataclasses.
    """

    def test_fullSample(self) -> None:
        """
        The contract's sample, restricted to the keys implemented, loads
        every value into the matching dataclass field.
        """
        directory = self.makeDirectory()
        certificate, key = writeCertificate(directory)
        users = os.path.join(directory, "users")
        with open(users, "w") as f:
            f.write("alice:secret\n")
        path = self.writeConfig(
            directory,
            f"""\
[server]
hostname = "relay.example.com"     # greeting, Received, Message-ID, bounces
max_message_size = 26214400        # bytes; advertised as SIZE
max_recipients = 100
max_connections = 1000
max_connections_per_ip = 20
idle_timeout = 300                 # seconds
max_line_length = 2000
reverse_dns = true

[tls]
certificate = "{certificate}"
private_key = "{key}"
minimum_version = "TLSv1.3"

[[listener]]                       # one or more (required)
endpoint = "tcp:port=587"
tls = "starttls"

[[listener]]
endpoint = "tcp:port=465:interface=192.0.2.1"
tls = "implicit"

[auth]
checkers = ["file:{users}", "memory:bob:secret"]
mechanisms = ["PLAIN", "LOGIN"]
require_tls = true

[relay]
trusted_networks = ["192.0.2.0/24", "2001:db8::/32"]
trusted_relays = ["198.51.100.7"]

[queue]
directory = "/var/spool/smtpauth-relay"

[delivery]
mode = "maildir"
directory = "/var/mail/relay"
""",
        )
        self.assertEqual(
            loadConfig(path),
            Config(
                server=ServerConfig(
                    hostname="relay.example.com",
                    max_message_size=26214400,
                    max_recipients=100,
                    max_connections=1000,
                    max_connections_per_ip=20,
                    idle_timeout=300.0,
                    max_line_length=2000,
                    reverse_dns=True,
                ),
                tls=TLSConfig(
                    certificate=certificate,
                    private_key=key,
                    minimum_version="TLSv1.3",
                ),
                listeners=(
                    ListenerConfig(endpoint="tcp:port=587", tls="starttls"),
                    ListenerConfig(
                        endpoint="tcp:port=465:interface=192.0.2.1", tls="implicit"
                    ),
                ),
                auth=AuthConfig(
                    checkers=(f"file:{users}", "memory:bob:secret"),
                    mechanisms=("PLAIN", "LOGIN"),
                    require_tls=True,
                ),
                relay=RelayConfig(
                    trusted_networks=(
                        ipaddress.ip_network("192.0.2.0/24"),
                        ipaddress.ip_network("2001:db8::/32"),
                    ),
                    trusted_relays=(ipaddress.ip_network("198.51.100.7/32"),),
                ),
                queue=QueueConfig(directory="/var/spool/smtpauth-relay"),
                delivery=DeliveryConfig(mode="maildir", directory="/var/mail/relay"),
                path=path,
            ),
        )

    def test_defaults(self) -> None:
        """
        Every key left out takes its documented default; the host name
        defaults to the machine's fully qualified name.
        """
        config = parseConfig(
            '[[listener]]\nendpoint = "tcp:port=587"\ntls = "none"\n'
            '[auth]\nrequire_tls = false\n[delivery]\ndirectory = "/srv/mail"\n',
            "/etc/relay.toml",
        )
        self.assertEqual(
            config.server,
            ServerConfig(
                hostname=socket.getfqdn(),
                max_message_size=26214400,
                max_recipients=100,
                max_connections=1000,
                max_connections_per_ip=20,
                idle_timeout=300.0,
                max_line_length=1000,
                reverse_dns=False,
            ),
        )
        self.assertEqual(config.tls, TLSConfig(None, None, "TLSv1.2"))
        self.assertEqual(config.auth.checkers, ())
        self.assertEqual(config.auth.mechanisms, ("PLAIN", "LOGIN", "SCRAM-SHA-256"))
        self.assertEqual(config.relay, RelayConfig((), ()))
        self.assertEqual(config.queue, QueueConfig("/var/spool/smtpauth-relay"))
        self.assertEqual(config.delivery, DeliveryConfig("maildir", "/srv/mail"))
        self.assertEqual(config.path, "/etc/relay.toml")

    def test_listenerTLSDefault(self) -> None:
        """
        A listener without C{tls} uses STARTTLS.
        """
        directory = self.makeDirectory()
        certificate, key = writeCertificate(directory)
        config = parseConfig(
            complete(
                f'[tls]\ncertificate = "{certificate}"\nprivate_key = "{key}"\n'
                '[[listener]]\nendpoint = "tcp:port=587"\n'
            ),
            "relay.toml",
        )
        self.assertEqual(
            config.listeners, (ListenerConfig("tcp:port=587", "starttls"),)
        )

    def test_frozen(self) -> None:
        """
        The configuration cannot be changed once loaded.
        """
        config = parseConfig(complete(""), "relay.toml")
        self.assertRaises(AttributeError, setattr, config.server, "max_recipients", 1)
        self.assertRaises(AttributeError, setattr, config, "path", "x")

    def test_relativePaths(self) -> None:
        """
        Relative certificate, key, queue and maildir paths are taken from
        the configuration file's directory and stored absolute.
        """
        directory = self.makeDirectory()
        os.makedirs(os.path.join(directory, "tls"))
        writeCertificate(os.path.join(directory, "tls"))
        path = self.writeConfig(
            directory,
            complete(
                "[tls]\n"
                'certificate = "tls/relay.crt"\n'
                'private_key = "./tls/relay.key"\n'
                "[queue]\n"
                'directory = "spool"\n'
                "[delivery]\n"
                'directory = "../maildir"\n'
            ),
        )
        config = loadConfig(path)
        self.assertEqual(
            config.tls.certificate, os.path.join(directory, "tls/relay.crt")
        )
        self.assertEqual(
            config.tls.private_key, os.path.join(directory, "tls/relay.key")
        )
        self.assertEqual(config.queue.directory, os.path.join(directory, "spool"))
        self.assertEqual(
            config.delivery.directory,
            os.path.join(os.path.dirname(directory), "maildir"),
        )

    def test_relativeToRelativeConfigPath(self) -> None:
        """
        A configuration path given relative to the working directory still
        gives absolute paths, based on the file's own directory.
        """
        config = parseConfig(
            complete('[queue]\ndirectory = "spool"\n'), "etc/relay.toml"
        )
        self.assertEqual(config.queue.directory, os.path.abspath("etc/spool"))

    def test_emptyCertificateIsUnset(self) -> None:
        """
        An empty C{certificate} and C{private_key} mean "no TLS", as an
        absent key does.
        """
        config = parseConfig(
            complete('[tls]\ncertificate = ""\nprivate_key = ""\n'), "relay.toml"
        )
        self.assertEqual(config.tls, TLSConfig(None, None))

    def test_integerIdleTimeout(self) -> None:
        """
        An integer is accepted where a number of seconds is expected, and
        stored as a float.
        """
        config = parseConfig(complete("[server]\nidle_timeout = 30\n"), "relay.toml")
        self.assertEqual(config.server.idle_timeout, 30.0)
        self.assertIsInstance(config.server.idle_timeout, float)
        config = parseConfig(complete("[server]\nidle_timeout = 2.5\n"), "relay.toml")
        self.assertEqual(config.server.idle_timeout, 2.5)

    def test_maxLineLengthMinimum(self) -> None:
        """
        C{max_line_length} may go as low as 80.
        """
        config = parseConfig(complete("[server]\nmax_line_length = 80\n"), "relay.toml")
        self.assertEqual(config.server.max_line_length, 80)

    def test_mechanismsUpperCased(self) -> None:
        """
        Mechanism names are upper-cased and repeats dropped, keeping the
        order given.
        """
        config = parseConfig(
            complete(
                '[auth]\nrequire_tls = false\nmechanisms = ["login", "Plain", "LOGIN"]\n'
            ),
            "relay.toml",
        )
        self.assertEqual(config.auth.mechanisms, ("LOGIN", "PLAIN"))

    def test_systemdEndpoints(self) -> None:
        """
        C{systemd:} endpoints are accepted by index or by name, although no
        descriptors are inherited.
        """
        config = parseConfig(
            complete(
                '[[listener]]\nendpoint = "systemd:domain=INET:index=0"\ntls = "none"\n'
                '[[listener]]\nendpoint = "systemd:domain=INET6:name=smtp"\n'
                'tls = "none"\n'
                '[[listener]]\nendpoint = "systemd:domain=UNIX:index=1"\n'
                'tls = "none"\n'
            ),
            "relay.toml",
        )
        self.assertEqual(
            [listener.endpoint for listener in config.listeners],
            [
                "systemd:domain=INET:index=0",
                "systemd:domain=INET6:name=smtp",
                "systemd:domain=UNIX:index=1",
            ],
        )

    def test_otherEndpoints(self) -> None:
        """
        Any endpoint Twisted can parse is accepted: TCP with options, UNIX
        sockets.
        """
        config = parseConfig(
            complete(
                '[[listener]]\nendpoint = "tcp:2525:interface=127.0.0.1"\ntls = "none"\n'
                '[[listener]]\nendpoint = "unix:/run/relay.sock:mode=660"\n'
                'tls = "none"\n'
                '[[listener]]\nendpoint = "tcp6:port=2526"\ntls = "none"\n'
            ),
            "relay.toml",
        )
        self.assertEqual(len(config.listeners), 3)

    def test_noTLSWithTrustedNetworks(self) -> None:
        """
        With only plain listeners, C{require_tls = true} is fine when some
        networks may relay without AUTH.
        """
        config = parseConfig(
            complete('[relay]\ntrusted_networks = ["192.0.2.0/24"]\n[auth]\n'),
            "relay.toml",
        )
        self.assertTrue(config.auth.require_tls)

    def test_crlfLineEndings(self) -> None:
        """
        Files with CRLF line endings load, and problems name the right line.
        """
        text = complete("[server]\nmax_recipients = 5\n").replace("\n", "\r\n")
        self.assertEqual(parseConfig(text, "relay.toml").server.max_recipients, 5)
        text = "[server]\r\n\r\nmax_recipients = 0\r\n"
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                "relay.toml:3: [server] max_recipients: must be a positive integer, got 0"
            ],
        )


class FileTests(ConfigTestCase):
    """
    Problems with the file itself.
    """

    def test_missingFile(self) -> None:
        """
        A missing file gives one line naming the file and the reason.
        """
        path = os.path.join(self.makeDirectory(), "nope.toml")
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(
            error.problems,
            [f"{path}: cannot read configuration file: No such file or directory"],
        )

    def test_directory(self) -> None:
        """
        A directory is not a configuration file.
        """
        path = self.makeDirectory()
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(
            error.problems, [f"{path}: cannot read configuration file: Is a directory"]
        )

    def test_notUTF8(self) -> None:
        """
        A file that is not UTF-8 gives one line naming the line of the first
        bad byte.
        """
        directory = self.makeDirectory()
        path = os.path.join(directory, "relay.toml")
        with open(path, "wb") as f:
            f.write(b'[server]\nhostname = "caf\xe9"\n')
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(error.problems, [f"{path}:2: not valid UTF-8 text"])

    def test_syntaxError(self) -> None:
        """
        A TOML syntax error is reported as tomllib words it, with its line
        number in front too.
        """
        self.assertEqual(
            self.problemsOf("[server]\nmax_recipients = \n"),
            ["relay.toml:2: TOML syntax error: Invalid value (at line 2, column 18)"],
        )

    def test_errorMessage(self) -> None:
        """
        The exception's message is its problems, one per line.
        """
        error = self.assertRaises(ConfigError, parseConfig, "[server]\nx = 1\n", "r")
        self.assertEqual(str(error), "\n".join(error.problems))


class LineNumberTests(ConfigTestCase):
    """
    Problems name the line of the key at fault, however the document is laid
    out.
    """

    def test_multilineStringNotScanned(self) -> None:
        """
        Text inside a multi-line string that looks like a key is not taken
        for one.
        """
        text = (
            "[server]\n"  # 1
            "future = '''\n"  # 2
            "max_recipients = 0\n"  # 3
            "'''\n"  # 4
            "max_recipients = 0\n"  # 5
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                "relay.toml:2: [server] future: unknown key",
                "relay.toml:5: [server] max_recipients: must be a positive integer, got 0",
            ],
        )

    def test_multilineBasicStringWithEscapes(self) -> None:
        """
        Escaped quotes inside a multi-line basic string do not end it.
        """
        text = (
            "[server]\n"  # 1
            'future = """\n'  # 2
            '\\"""\n'  # 3
            "[tls]\n"  # 4
            '"""\n'  # 5
            "max_recipients = 0\n"  # 6
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                "relay.toml:2: [server] future: unknown key",
                "relay.toml:6: [server] max_recipients: must be a positive integer, got 0",
            ],
        )

    def test_nestedArraysNotHeaders(self) -> None:
        """
        Lines of a multi-line nested array that start with C{[} are not taken
        for table headers.
        """
        text = (
            "[server]\n"  # 1
            "future = [\n"  # 2
            "  [1, 2],  # a comment with [brackets]\n"  # 3
            '  ["]", 4],\n'  # 4
            "]\n"  # 5
            "max_recipients = 0\n"  # 6
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                "relay.toml:2: [server] future: unknown key",
                "relay.toml:6: [server] max_recipients: must be a positive integer, got 0",
            ],
        )

    def test_arrayElementLines(self) -> None:
        """
        A bad element of a multi-line array is reported on its own line.
        """
        text = (
            "[relay]\n"  # 1
            "trusted_networks = [\n"  # 2
            '  "192.0.2.0/24",\n'  # 3
            "  # a comment\n"  # 4
            '  "192.0.2.1/24",\n'  # 5
            "]\n"  # 6
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                'relay.toml:5: [relay] trusted_networks[1]: "192.0.2.1/24" has host '
                'bits set; did you mean "192.0.2.0/24"?'
            ],
        )

    def test_dottedKeyFallsBack(self) -> None:
        """
        A problem inside a dotted key is reported on that key's line.
        """
        text = (
            "[auth]\n"  # 1
            "require_tls = false\n"  # 2
            "lockout.max_failures = 0\n"  # 3
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                "relay.toml:3: [auth.lockout] max_failures: must be a positive "
                "integer, got 0"
            ],
        )

    def test_inlineTables(self) -> None:
        """
        Inline tables are located: an array of inline listener tables gives
        each listener its line, and a bad key inside one is reported there.
        """
        text = (
            "listener = [\n"  # 1
            '  { endpoint = "tcp:port=2525", tls = "none" },\n'  # 2
            '  { endpoint = "tcp:port=x", tls = "none" },\n'  # 3
            "]\n"  # 4
            "[server]\n"  # 5
            "max_recipients = 0\n"  # 6
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                'relay.toml:3: [listener #2] endpoint: invalid endpoint "tcp:port=x": '
                "invalid literal for int() with base 10: 'x'",
                "relay.toml:6: [server] max_recipients: must be a positive integer, got 0",
            ],
        )

    def test_quotedKeys(self) -> None:
        """
        Quoted keys are matched to the keys they spell.
        """
        text = (
            "[server]\n"  # 1
            '"max_recipients" = 1\n'  # 2
            "'max_connections' = 0\n"  # 3
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                "relay.toml:3: [server] max_connections: must be a positive integer, "
                "got 0"
            ],
        )

    def test_secondListener(self) -> None:
        """
        Listeners are numbered from 1 in the order written, each located by
        its own keys.
        """
        text = (
            "[[listener]]\n"  # 1
            'endpoint = "tcp:port=2525"\n'  # 2
            'tls = "none"\n'  # 3
            "\n"  # 4
            "[[listener]]  # second\n"  # 5
            'endpoint = "tcp:port=2526"\n'  # 6
            'tls = "sometimes"\n'  # 7
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                'relay.toml:7: [listener #2] tls: "sometimes" is not one of '
                '"starttls", "implicit", "none"'
            ],
        )


class StructureTests(ConfigTestCase):
    """
    Unknown and misshapen sections and keys.
    """

    def test_unknownSection(self) -> None:
        """
        A section that is not known is reported at its header, with the
        closest known name when there is one.
        """
        self.assertEqual(
            self.problemsOf(complete("[statistics]\nrate = 5\n\n[servr]\n")),
            [
                "relay.toml:1: [statistics]: unknown section",
                'relay.toml:4: [servr]: unknown section; did you mean "server"?',
            ],
        )

    def test_unknownArraySection(self) -> None:
        """
        C{[[listeners]]} is an unknown section, with C{listener} suggested.
        """
        self.assertEqual(
            self.problemsOf(complete('[[listeners]]\nendpoint = "tcp:25"\n')),
            ['relay.toml:1: [listeners]: unknown section; did you mean "listener"?'],
        )

    def test_topLevelKey(self) -> None:
        """
        A key before any section header is reported, naming the section it
        belongs in when it is a known key.
        """
        self.assertEqual(
            self.problemsOf(complete('hostname = "relay.example.com"\nfoo = 1\n')),
            [
                'relay.toml:1: hostname: keys must be inside a section; "hostname" '
                "belongs in [server]",
                "relay.toml:2: foo: keys must be inside a section",
            ],
        )

    def test_sectionNotTable(self) -> None:
        """
        A section written as an array of tables, or as a plain value, is
        reported.
        """
        self.assertEqual(
            self.problemsOf(complete("queue = 5\n[[server]]\nmax_recipients = 5\n")),
            [
                "relay.toml:1: [queue]: must be a table, got an integer (5)",
                "relay.toml:2: [server]: must be a single table: write [server], "
                "not [[server]]",
            ],
        )

    def test_listenerNotArray(self) -> None:
        """
        C{[listener]} instead of C{[[listener]]} is reported with the fix.
        """
        text = (
            "[listener]\n"  # 1
            'endpoint = "tcp:port=25"\n'  # 2
            "[auth]\n"  # 3
            "require_tls = false\n"  # 4
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                "relay.toml:1: [listener]: must be an array of tables: write "
                "[[listener]], once per listener"
            ],
        )

    def test_listenerNotTable(self) -> None:
        """
        A listener that is not a table is reported by its number.
        """
        self.assertEqual(
            self.problemsOf(complete('listener = ["tcp:port=25"]\n')),
            [
                'relay.toml:1: [listener #1]: expected a table, got a string ("tcp:port=25")'
            ],
        )

    def test_noListener(self) -> None:
        """
        A document without any listener is reported, without a line.
        """
        self.assertEqual(
            self.problemsOf(
                '[auth]\nrequire_tls = false\n[delivery]\ndirectory = "/srv/mail"\n'
            ),
            [
                "relay.toml: [listener]: at least one [[listener]] is required, e.g. "
                'endpoint = "tcp:port=587"'
            ],
        )

    def test_emptyListenerArray(self) -> None:
        """
        An empty array of listeners is reported at its line.
        """
        self.assertEqual(
            self.problemsOf(complete("\nlistener = []\n")),
            ["relay.toml:2: [listener]: at least one listener is required"],
        )

    def test_listenerWithoutEndpoint(self) -> None:
        """
        A listener without an endpoint is reported by number, without a line.
        """
        self.assertEqual(
            self.problemsOf(complete('[[listener]]\ntls = "none"\n')),
            ["relay.toml: [listener #1] endpoint: required key is missing"],
        )

    def test_unknownKeySuggestion(self) -> None:
        """
        An unknown key is reported at its line with the closest valid key of
        its section.
        """
        self.assertEqual(
            self.problemsOf(complete("[server]\n\nmax_mesage_size = 5\n")),
            [
                "relay.toml:3: [server] max_mesage_size: unknown key; did you mean "
                '"max_message_size"?'
            ],
        )

    def test_unknownKeyOtherSection(self) -> None:
        """
        A key written in the wrong section is reported with the section it
        belongs in.
        """
        self.assertEqual(
            self.problemsOf(complete('[server]\ncertificate = "x.pem"\n')),
            [
                'relay.toml:2: [server] certificate: unknown key; "certificate" '
                "belongs in [tls]"
            ],
        )

    def test_unknownKeyNoSuggestion(self) -> None:
        """
        An unknown key like no valid one is reported without a suggestion.
        """
        self.assertEqual(
            self.problemsOf(complete("[queue]\nzzz = 1\n")),
            ["relay.toml:2: [queue] zzz: unknown key"],
        )

    def test_unknownSubTable(self) -> None:
        """
        A sub-table of a known section is an unknown key, reported at its
        header; C{[auth.lockout]} is known, and its keys are checked.
        """
        text = (
            "[relay]\n"  # 1
            "[relay.extra]\n"  # 2
            "x = 5\n"  # 3
            "[auth]\n"  # 4
            "require_tls = false\n"  # 5
            "[auth.lockout]\n"  # 6
            "max_failures = 5\n"  # 7
            "maxfailures = 5\n"  # 8
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                "relay.toml:2: [relay] extra: unknown key",
                "relay.toml:8: [auth.lockout] maxfailures: unknown key; did you mean "
                '"max_failures"?',
            ],
        )

    def test_limits(self) -> None:
        """
        C{[limits]} loads; 0 means no limit; negative numbers are refused.
        """
        config = parseConfig(
            complete("[limits]\nmessages_per_hour = 0\nrecipients_per_hour = 50\n"),
            "relay.toml",
        )
        self.assertEqual(config.limits.messages_per_hour, 0)
        self.assertEqual(config.limits.recipients_per_hour, 50)
        self.assertEqual(config.limits.connections_per_minute, 60)
        self.assertEqual(
            self.problemsOf(complete("[limits]\nmessages_per_session = -1\n")),
            ["relay.toml:2: [limits] messages_per_session: must be at least 0, got -1"],
        )

    def test_lockout(self) -> None:
        """
        C{[auth.lockout]} loads, with the subnet limit defaulting to ten
        times max_failures, and max_duration not below duration.
        """
        config = parseConfig(
            complete(
                "[auth]\nrequire_tls = false\n[auth.lockout]\nmax_failures = 3\n"
                "window = 60\nduration = 120\ntrusted_after_success = 0\n"
            ),
            "relay.toml",
        )
        self.assertEqual(config.auth.lockout.subnet_max_failures, 30)
        self.assertEqual(config.auth.lockout.trusted_after_success, 0.0)
        self.assertEqual(
            self.problemsOf(
                complete(
                    "[auth]\nrequire_tls = false\n[auth.lockout]\nduration = 100\n"
                    "max_duration = 50\n"
                )
            ),
            [
                "relay.toml:5: [auth.lockout] max_duration: must not be less than "
                "duration"
            ],
        )


class TypeAndRangeTests(ConfigTestCase):
    """
    Values of the wrong type or out of range.
    """

    def test_booleanNotInteger(self) -> None:
        """
        C{true} is not accepted where an integer is expected.
        """
        self.assertEqual(
            self.problemsOf(complete("[server]\nmax_recipients = true\n")),
            [
                "relay.toml:2: [server] max_recipients: expected an integer, "
                "got a boolean (true)"
            ],
        )

    def test_stringNotInteger(self) -> None:
        """
        A quoted number is not an integer.
        """
        self.assertEqual(
            self.problemsOf(complete('[server]\nmax_message_size = "25M"\n')),
            [
                "relay.toml:2: [server] max_message_size: expected an integer, "
                'got a string ("25M")'
            ],
        )

    def test_floatNotInteger(self) -> None:
        """
        A float is not accepted where an integer is expected.
        """
        self.assertEqual(
            self.problemsOf(complete("[server]\nmax_connections = 10.0\n")),
            [
                "relay.toml:2: [server] max_connections: expected an integer, "
                "got a float (10.0)"
            ],
        )

    def test_booleanNotNumber(self) -> None:
        """
        C{true} is not accepted where a number of seconds is expected.
        """
        self.assertEqual(
            self.problemsOf(complete("[server]\nidle_timeout = true\n")),
            [
                "relay.toml:2: [server] idle_timeout: expected a number, "
                "got a boolean (true)"
            ],
        )

    def test_wrongBoolean(self) -> None:
        """
        A string is not accepted where a boolean is expected.
        """
        self.assertEqual(
            self.problemsOf(complete('[server]\nreverse_dns = "yes"\n')),
            [
                "relay.toml:2: [server] reverse_dns: expected a boolean (true or "
                'false), got a string ("yes")'
            ],
        )

    def test_wrongString(self) -> None:
        """
        An integer is not accepted where a string is expected.
        """
        self.assertEqual(
            self.problemsOf(complete("[queue]\ndirectory = 5\n")),
            ["relay.toml:2: [queue] directory: expected a string, got an integer (5)"],
        )

    def test_wrongArray(self) -> None:
        """
        A string is not accepted where an array of strings is expected, and
        non-string elements are reported by index.
        """
        text = (
            "[auth]\n"  # 1
            "require_tls = false\n"  # 2
            'checkers = "memory:a:b"\n'  # 3
            'mechanisms = ["PLAIN", 1]\n'  # 4
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                "relay.toml:3: [auth] checkers: expected an array of strings, got a "
                'string ("memory:a:b")',
                "relay.toml:4: [auth] mechanisms[1]: expected a string, got an "
                "integer (1)",
            ],
        )

    def test_nonPositiveSizes(self) -> None:
        """
        Sizes and counts must be positive: zero and negative numbers are
        each reported at their line.
        """
        text = (
            "[server]\n"  # 1
            "max_message_size = 0\n"  # 2
            "max_recipients = -1\n"  # 3
            "max_connections = 0\n"  # 4
            "max_connections_per_ip = -20\n"  # 5
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                "relay.toml:2: [server] max_message_size: must be a positive integer, "
                "got 0",
                "relay.toml:3: [server] max_recipients: must be a positive integer, "
                "got -1",
                "relay.toml:4: [server] max_connections: must be a positive integer, "
                "got 0",
                "relay.toml:5: [server] max_connections_per_ip: must be a positive "
                "integer, got -20",
            ],
        )

    def test_maxLineLengthTooShort(self) -> None:
        """
        C{max_line_length} below 80 is reported.
        """
        self.assertEqual(
            self.problemsOf(complete("[server]\nmax_line_length = 79\n")),
            ["relay.toml:2: [server] max_line_length: must be at least 80, got 79"],
        )

    def test_idleTimeoutNotPositive(self) -> None:
        """
        C{idle_timeout} must be above zero and finite.
        """
        for value in ("0", "-1.5", "inf", "nan"):
            self.assertEqual(
                self.problemsOf(complete(f"[server]\nidle_timeout = {value}\n")),
                [
                    "relay.toml:2: [server] idle_timeout: must be a positive number "
                    f"of seconds, got {value}"
                ],
            )

    def test_badHostname(self) -> None:
        """
        A host name with spaces (or anything else a greeting cannot carry)
        is reported.
        """
        self.assertEqual(
            self.problemsOf(complete('[server]\nhostname = "relay example"\n')),
            [
                'relay.toml:2: [server] hostname: "relay example" is not a valid host '
                'name (letters, digits, "-" and "." only; write internationalised '
                "names in their xn-- form)"
            ],
        )

    def test_goodHostnames(self) -> None:
        """
        Dotted names, a trailing dot and address literals are host names.
        """
        for name in ("relay.example.com", "relay-1.example.com.", "mx", "[192.0.2.1]"):
            config = parseConfig(
                complete(f'[server]\nhostname = "{name}"\n'), "relay.toml"
            )
            self.assertEqual(config.server.hostname, name)

    def test_emptyQueueDirectory(self) -> None:
        """
        The queue directory cannot be empty.
        """
        self.assertEqual(
            self.problemsOf(complete('[queue]\ndirectory = ""\n')),
            ["relay.toml:2: [queue] directory: must not be empty"],
        )

    @settings(derandomize=True)
    @given(st.integers())
    def test_anyMaxRecipients(self, value: int) -> None:
        """
        Any integer for C{max_recipients} either loads as itself (when
        positive) or gives exactly one problem, naming that key and line.
        """
        text = complete(f"[server]\nmax_recipients = {value}\n")
        if value > 0:
            self.assertEqual(
                parseConfig(text, "relay.toml").server.max_recipients, value
            )
        else:
            [problem] = self.problemsOf(text)
            self.assertTrue(
                problem.startswith("relay.toml:2: [server] max_recipients: "), problem
            )

    @settings(derandomize=True)
    @given(st.from_regex(r"[a-z_]{1,24}", fullmatch=True))
    def test_anyServerKey(self, key: str) -> None:
        """
        Any bare key in C{[server]} that is not a server key gives exactly
        one problem: an unknown key, at its line.
        """
        assume(key not in SERVER_KEYS)
        [problem] = self.problemsOf(complete(f"[server]\n{key} = 1\n"))
        self.assertTrue(
            problem.startswith(f"relay.toml:2: [server] {key}: unknown key"), problem
        )


class EnumTests(ConfigTestCase):
    """
    Values that must be one of a few words.
    """

    def test_listenerTLS(self) -> None:
        """
        A listener's C{tls} must be starttls, implicit or none; a near miss
        gets a suggestion.
        """
        self.assertEqual(
            self.problemsOf(
                complete('[[listener]]\nendpoint = "tcp:port=25"\ntls = "startls"\n')
            ),
            [
                'relay.toml:3: [listener #1] tls: "startls" is not one of "starttls", '
                '"implicit", "none"; did you mean "starttls"?'
            ],
        )

    def test_minimumVersion(self) -> None:
        """
        C{minimum_version} must be spelt as documented; a different case gets
        the right spelling suggested, and TLSv1.1 is refused without a
        suggestion.
        """
        self.assertEqual(
            self.problemsOf(complete('[tls]\nminimum_version = "tlsv1.3"\n')),
            [
                'relay.toml:2: [tls] minimum_version: "tlsv1.3" is not one of '
                '"TLSv1.2", "TLSv1.3"; did you mean "TLSv1.3"?'
            ],
        )
        self.assertEqual(
            self.problemsOf(complete('[tls]\nminimum_version = "TLSv1.1"\n')),
            [
                'relay.toml:2: [tls] minimum_version: "TLSv1.1" is not one of '
                '"TLSv1.2", "TLSv1.3"'
            ],
        )

    def test_mechanisms(self) -> None:
        """
        Mechanisms other than PLAIN, LOGIN, SCRAM-SHA-256 and CRAM-MD5 are
        reported by index.
        """
        text = (
            "[auth]\n"  # 1
            "require_tls = false\n"  # 2
            'mechanisms = ["PLAIN", "DIGEST-MD5"]\n'  # 3
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                'relay.toml:3: [auth] mechanisms[1]: "DIGEST-MD5" is not one of '
                '"PLAIN", "LOGIN", "SCRAM-SHA-256", "CRAM-MD5"'
            ],
        )

    def test_noMechanisms(self) -> None:
        """
        An empty list of mechanisms is reported.
        """
        self.assertEqual(
            self.problemsOf(complete("[auth]\nrequire_tls = false\nmechanisms = []\n")),
            ["relay.toml:3: [auth] mechanisms: at least one mechanism is required"],
        )

    def test_deliveryModeUnknown(self) -> None:
        """
        An unknown delivery mode is reported with the closest known one.
        """
        self.assertEqual(
            self.problemsOf(
                complete('[delivery]\nmode = "maildr"\ndirectory = "/m"\n')
            ),
            [
                'relay.toml:2: [delivery] mode: "maildr" is not one of "smarthost", '
                '"mx", "maildir"; did you mean "maildir"?'
            ],
        )

    def test_smarthostNeedsHost(self) -> None:
        """
        Smarthost delivery without a host is reported.
        """
        self.assertEqual(
            self.problemsOf(complete('[delivery]\nmode = "smarthost"\n')),
            ['relay.toml: [delivery] host: required when mode = "smarthost"'],
        )

    def test_smarthostDefaultPorts(self) -> None:
        """
        The smarthost port defaults by TLS mode: 587 for STARTTLS, 465 for
        implicit TLS, 25 without TLS; mx mode uses 25.
        """
        for tls, port in (("starttls", 587), ("implicit", 465), ("none", 25)):
            config = parseConfig(
                complete(
                    f'[delivery]\nmode = "smarthost"\nhost = "smtp.example.net"\n'
                    f'tls = "{tls}"\n'
                ),
                "relay.toml",
            )
            self.assertEqual(config.delivery.port, port)
        config = parseConfig(complete('[delivery]\nmode = "mx"\n'), "relay.toml")
        self.assertEqual(config.delivery.port, 25)

    def test_smarthostCredentials(self) -> None:
        """
        A username needs a password file and the reverse; the password file
        must be readable and not empty; credentials are never sent without
        TLS.
        """
        self.assertEqual(
            self.problemsOf(
                complete(
                    '[delivery]\nmode = "smarthost"\nhost = "smtp.example.net"\n'
                    'username = "relay"\n'
                )
            ),
            ["relay.toml: [delivery] password_file: required when username is set"],
        )
        empty = self.mktemp()
        with open(empty, "w"):
            pass
        self.assertEqual(
            self.problemsOf(
                complete(
                    '[delivery]\nmode = "smarthost"\nhost = "smtp.example.net"\n'
                    f'username = "relay"\npassword_file = "{empty}"\ntls = "none"\n'
                )
            ),
            [
                f'relay.toml:5: [delivery] password_file: "{os.path.abspath(empty)}" '
                "is empty",
                'relay.toml:6: [delivery] tls: "none" would send the smarthost '
                'password unencrypted; use "starttls" or "implicit"',
            ],
        )

    def test_smarthostComplete(self) -> None:
        """
        A complete smarthost section loads with every key.
        """
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write("s3cret\n")
        config = parseConfig(
            complete(
                '[delivery]\nmode = "smarthost"\nhost = "smtp.example.net"\n'
                f'port = 2525\ntls = "implicit"\nverify = false\nusername = "relay"\n'
                f'password_file = "{secret}"\nforward_auth_identity = true\n'
                "max_per_destination = 4\nconnect_timeout = 10\ntimeout = 120\n"
            ),
            "relay.toml",
        )
        delivery = config.delivery
        self.assertEqual(
            (
                delivery.mode,
                delivery.host,
                delivery.port,
                delivery.tls,
                delivery.verify,
                delivery.username,
                delivery.password_file,
                delivery.forward_auth_identity,
                delivery.max_per_destination,
                delivery.connect_timeout,
                delivery.timeout,
            ),
            (
                "smarthost",
                "smtp.example.net",
                2525,
                "implicit",
                False,
                "relay",
                os.path.abspath(secret),
                True,
                4,
                10.0,
                120.0,
            ),
        )

    def test_nameservers(self) -> None:
        """
        Name servers are IP addresses with an optional port.
        """
        config = parseConfig(
            complete(
                '[delivery]\nmode = "mx"\nnameservers = ["127.0.0.1:5353", "::1"]\n'
            ),
            "relay.toml",
        )
        self.assertEqual(config.delivery.nameservers, ("127.0.0.1:5353", "::1"))
        self.assertEqual(
            self.problemsOf(
                complete('[delivery]\nmode = "mx"\nnameservers = ["dns.example"]\n')
            ),
            [
                'relay.toml:3: [delivery] nameservers[0]: "dns.example" is not an IP '
                "address (with an optional :port)"
            ],
        )

    def test_retrySchedule(self) -> None:
        """
        The retry schedule is a non-empty array of positive numbers.
        """
        config = parseConfig(
            complete("[queue]\nretry_schedule = [30, 90.5]\ndelay_warning = 0\n"),
            "relay.toml",
        )
        self.assertEqual(config.queue.retry_schedule, (30.0, 90.5))
        self.assertEqual(config.queue.delay_warning, 0.0)
        self.assertEqual(
            self.problemsOf(complete('[queue]\nretry_schedule = [60, -1, "x"]\n')),
            [
                "relay.toml:2: [queue] retry_schedule[1]: expected a positive number "
                "of seconds, got an integer (-1)",
                "relay.toml:2: [queue] retry_schedule[2]: expected a positive number "
                'of seconds, got a string ("x")',
            ],
        )
        self.assertEqual(
            self.problemsOf(complete("[queue]\nretry_schedule = []\n")),
            ["relay.toml:2: [queue] retry_schedule: must not be empty"],
        )

    def test_flowDelay(self) -> None:
        """
        C{flow_delay} is 1 second by default, 0 turns it off, and it is at
        most 10 seconds (clients wait that long for the reply to MAIL).
        """
        self.assertEqual(parseConfig(complete(""), "relay.toml").queue.flow_delay, 1.0)
        config = parseConfig(complete("[queue]\nflow_delay = 0\n"), "relay.toml")
        self.assertEqual(config.queue.flow_delay, 0.0)
        self.assertEqual(
            self.problemsOf(complete("[queue]\nflow_delay = 30\n")),
            [
                "relay.toml:2: [queue] flow_delay: must be at most 10 seconds "
                "(clients wait that long for the reply to MAIL FROM), got 30"
            ],
        )
        self.assertEqual(
            self.problemsOf(complete("[queue]\nflow_delay = -1\n")),
            ["relay.toml:2: [queue] flow_delay: must be 0 or more seconds, got -1"],
        )

    def test_workers(self) -> None:
        """
        C{[server] workers} is one process per core by default (stored as
        0, as for C{"auto"}), or 1 to 64 processes.
        """
        self.assertEqual(parseConfig(complete(""), "relay.toml").server.workers, 0)
        for text, expected in [('"auto"', 0), ("1", 1), ("4", 4), ("64", 64)]:
            config = parseConfig(complete(f"[server]\nworkers = {text}\n"), "r.toml")
            self.assertEqual(config.server.workers, expected)
        for text, problem in [
            ("0", 'must be from 1 to 64 or "auto", got 0'),
            ("65", 'must be from 1 to 64 or "auto", got 65'),
            ('"all"', 'expected an integer or "auto", got a string ("all")'),
            ("true", 'expected an integer or "auto", got a boolean (true)'),
        ]:
            self.assertEqual(
                self.problemsOf(complete(f"[server]\nworkers = {text}\n")),
                [f"relay.toml:2: [server] workers: {problem}"],
            )

    def test_maildirNeedsDirectory(self) -> None:
        """
        Maildir delivery without a directory is reported: without a line
        when the key is absent, at its line when it is empty.
        """
        self.assertEqual(
            self.problemsOf(complete('[delivery]\nmode = "maildir"\n')),
            ['relay.toml: [delivery] directory: required when mode = "maildir"'],
        )
        self.assertEqual(
            self.problemsOf(complete('[delivery]\ndirectory = ""\n')),
            ['relay.toml:2: [delivery] directory: required when mode = "maildir"'],
        )


class EndpointTests(ConfigTestCase):
    """
    Listener endpoint strings.
    """

    def assertEndpointProblem(self, endpoint: str, message: str) -> None:
        """
        Assert that C{endpoint} is reported with C{message}.
        """
        self.assertEqual(
            self.problemsOf(
                complete(f'[[listener]]\nendpoint = "{endpoint}"\ntls = "none"\n')
            ),
            [
                f'relay.toml:2: [listener #1] endpoint: invalid endpoint "{endpoint}": '
                + message
            ],
        )

    def test_unknownType(self) -> None:
        """
        An unknown endpoint type is reported.
        """
        self.assertEndpointProblem("tpc:port=587", "Unknown endpoint type: 'tpc'")

    def test_badPort(self) -> None:
        """
        A port that is not a number is reported.
        """
        self.assertEndpointProblem(
            "tcp:port=smtp", "invalid literal for int() with base 10: 'smtp'"
        )

    def test_unknownArgument(self) -> None:
        """
        An argument the endpoint type does not take is reported.
        """
        self.assertEndpointProblem(
            "tcp:port=587:intreface=127.0.0.1",
            "got an unexpected keyword argument 'intreface'",
        )

    def test_empty(self) -> None:
        """
        An empty endpoint is reported.
        """
        self.assertEndpointProblem("", "Unknown endpoint type: ''")

    def test_systemdNeedsIndexOrName(self) -> None:
        """
        A C{systemd:} endpoint needs exactly one of index and name.
        """
        self.assertEndpointProblem(
            "systemd:domain=INET", "give exactly one of index= or name="
        )
        self.assertEndpointProblem(
            "systemd:domain=INET:index=0:name=smtp",
            "give exactly one of index= or name=",
        )

    def test_systemdBadDomain(self) -> None:
        """
        A C{systemd:} endpoint needs a stream address family: INET, INET6 or
        UNIX.
        """
        self.assertEndpointProblem(
            "systemd:domain=IPX:index=0",
            'unknown domain "IPX" (use INET, INET6 or UNIX)',
        )

    def test_systemdBadIndex(self) -> None:
        """
        A C{systemd:} index must be a number.
        """
        self.assertEndpointProblem(
            "systemd:domain=INET:index=first", 'index must be a number, got "first"'
        )

    def test_systemdMissingDomain(self) -> None:
        """
        A C{systemd:} endpoint needs a domain.
        """
        self.assertEndpointProblem(
            "systemd:index=0", "missing 1 required positional argument: 'domain'"
        )

    def test_systemdUnknownArgument(self) -> None:
        """
        A C{systemd:} endpoint takes no other arguments.
        """
        self.assertEndpointProblem(
            "systemd:domain=INET:index=0:port=25",
            "got an unexpected keyword argument 'port'",
        )

    def test_haproxyRefused(self) -> None:
        """
        C{haproxy:} endpoints are refused: Twisted's wrapper would let the
        relay take every client for the proxy (trusted networks, limits,
        Received) and believes a PROXY header from anyone; the message
        points at our own proxy_protocol instead.
        """
        self.assertEndpointProblem(
            "haproxy:tcp:port=587",
            "use a tcp: endpoint with proxy_protocol = true and trusted_proxies "
            "in its [[listener]]",
        )

    def test_proxyProtocolNeedsTrustedProxies(self) -> None:
        """
        proxy_protocol without trusted_proxies is refused, and so is
        trusted_proxies without proxy_protocol (it would do nothing).
        """
        self.assertEqual(
            self.problemsOf(
                complete(
                    '[[listener]]\nendpoint = "tcp:port=2525"\ntls = "none"\n'
                    "proxy_protocol = true\n"
                )
            ),
            [
                "relay.toml:4: [listener #1] proxy_protocol: needs trusted_proxies, "
                'the networks the proxies connect from (e.g. ["10.0.0.5/32"])'
            ],
        )
        config = parseConfig(
            complete(
                '[[listener]]\nendpoint = "tcp:port=2525"\ntls = "none"\n'
                'proxy_protocol = true\ntrusted_proxies = ["10.0.0.5"]\n'
            ),
            "relay.toml",
        )
        self.assertTrue(config.listeners[0].proxy_protocol)
        self.assertEqual(len(config.listeners[0].trusted_proxies), 1)


class RelayTests(ConfigTestCase):
    """
    Network lists in C{[relay]}.
    """

    def test_hostBits(self) -> None:
        """
        A network with host bits set is reported with the network meant.
        """
        self.assertEqual(
            self.problemsOf(complete('[relay]\ntrusted_relays = ["10.0.0.1/8"]\n')),
            [
                'relay.toml:2: [relay] trusted_relays[0]: "10.0.0.1/8" has host bits '
                'set; did you mean "10.0.0.0/8"?'
            ],
        )

    def test_hostBitsIPv6(self) -> None:
        """
        IPv6 networks with host bits set are reported the same way.
        """
        self.assertEqual(
            self.problemsOf(
                complete('[relay]\ntrusted_networks = ["2001:db8::1/32"]\n')
            ),
            [
                'relay.toml:2: [relay] trusted_networks[0]: "2001:db8::1/32" has host '
                'bits set; did you mean "2001:db8::/32"?'
            ],
        )

    def test_notANetwork(self) -> None:
        """
        A string that is no address or network is reported.
        """
        self.assertEqual(
            self.problemsOf(
                complete('[relay]\ntrusted_networks = ["192.0.2.0/24", "lan"]\n')
            ),
            [
                'relay.toml:2: [relay] trusted_networks[1]: "lan" is not an IP address '
                'or a network in CIDR notation (such as "192.0.2.0/24" or '
                '"2001:db8::/32")'
            ],
        )

    @settings(derandomize=True)
    @given(st.ip_addresses(v=4), st.integers(min_value=0, max_value=32))
    def test_anyIPv4Network(self, address: ipaddress.IPv4Address, prefix: int) -> None:
        """
        Any IPv4 address with any prefix either loads as that network or is
        reported once, suggesting the network that holds the address.
        """
        cidr = f"{address}/{prefix}"
        text = complete(f'[relay]\ntrusted_networks = ["{cidr}"]\n')
        network = ipaddress.ip_network(cidr, strict=False)
        if network.network_address == address:
            config = parseConfig(text, "relay.toml")
            self.assertEqual(config.relay.trusted_networks, (network,))
        else:
            self.assertEqual(
                self.problemsOf(text),
                [
                    f'relay.toml:2: [relay] trusted_networks[0]: "{cidr}" has host '
                    f'bits set; did you mean "{network}"?'
                ],
            )


class TLSTests(ConfigTestCase):
    """
    The certificate and key, and listeners that need them.
    """

    def test_starttlsWithoutCertificate(self) -> None:
        """
        A STARTTLS listener (named or by default) or an implicit TLS listener
        without a certificate is reported, each listener once.
        """
        text = (
            "[[listener]]\n"  # 1
            'endpoint = "tcp:port=587"\n'  # 2
            "[[listener]]\n"  # 3
            'endpoint = "tcp:port=465"\n'  # 4
            'tls = "implicit"\n'  # 5
            "[[listener]]\n"  # 6
            'endpoint = "tcp:port=25"\n'  # 7
            'tls = "none"\n'  # 8
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                'relay.toml:5: [listener #2] tls: "implicit" needs [tls] certificate '
                'and private_key; set them, or use tls = "none"',
                'relay.toml: [listener #1] tls: "starttls" (the default) needs [tls] '
                'certificate and private_key; set them, or use tls = "none"',
            ],
        )

    def test_certificateWithoutKey(self) -> None:
        """
        A certificate without a key (or a key without a certificate) is
        reported on the missing key.
        """
        directory = self.makeDirectory()
        certificate, key = writeCertificate(directory)
        self.assertEqual(
            self.problemsOf(complete(f'[tls]\ncertificate = "{certificate}"\n')),
            ["relay.toml: [tls] private_key: required when certificate is set"],
        )
        self.assertEqual(
            self.problemsOf(
                complete(f'[tls]\ncertificate = ""\nprivate_key = "{key}"\n')
            ),
            ["relay.toml:2: [tls] certificate: required when private_key is set"],
        )

    def test_missingFiles(self) -> None:
        """
        Certificate and key files that do not exist are each reported.
        """
        directory = self.makeDirectory()
        path = self.writeConfig(
            directory,
            complete('[tls]\ncertificate = "cert.pem"\nprivate_key = "key.pem"\n'),
        )
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(
            error.problems,
            [
                f'{path}:2: [tls] certificate: cannot read "{directory}/cert.pem": '
                "No such file or directory",
                f'{path}:3: [tls] private_key: cannot read "{directory}/key.pem": '
                "No such file or directory",
            ],
        )

    def test_garbageFiles(self) -> None:
        """
        Files that hold no PEM certificate or key are reported on the key
        naming each.
        """
        directory = self.makeDirectory()
        for name in ("cert.pem", "key.pem"):
            with open(os.path.join(directory, name), "w") as f:
                f.write("not PEM\n")
        path = self.writeConfig(
            directory,
            complete('[tls]\ncertificate = "cert.pem"\nprivate_key = "key.pem"\n'),
        )
        problems = self.assertRaises(ConfigError, loadConfig, path).problems
        self.assertEqual(len(problems), 2)
        self.assertTrue(
            problems[0].startswith(
                f'{path}:2: [tls] certificate: "{directory}/cert.pem" holds no usable '
                "PEM certificate: "
            ),
            problems[0],
        )
        self.assertTrue(
            problems[1].startswith(
                f'{path}:3: [tls] private_key: "{directory}/key.pem" holds no usable '
                "PEM private key: "
            ),
            problems[1],
        )

    def test_keyOfAnotherCertificate(self) -> None:
        """
        A key that does not belong to the certificate is reported on the key.
        """
        directory = self.makeDirectory()
        certificate, _ = writeCertificate(directory, "one")
        _, key = writeCertificate(directory, "two")
        self.assertEqual(
            self.problemsOf(
                complete(
                    f'[tls]\ncertificate = "{certificate}"\nprivate_key = "{key}"\n'
                )
            ),
            [
                f'relay.toml:3: [tls] private_key: "{key}" does not match the '
                f'certificate in "{certificate}"'
            ],
        )

    def test_encryptedKey(self) -> None:
        """
        A passphrase-protected key is reported: nobody is there to type the
        passphrase, and no prompt is shown.
        """
        directory = self.makeDirectory()
        certificate, key = writeCertificate(directory, passphrase=b"secret")
        self.assertEqual(
            self.problemsOf(
                complete(
                    f'[tls]\ncertificate = "{certificate}"\nprivate_key = "{key}"\n'
                )
            ),
            [
                f'relay.toml:3: [tls] private_key: "{key}" is encrypted; the relay '
                "cannot ask for a passphrase, so store the key unencrypted"
            ],
        )

    def test_combinedFile(self) -> None:
        """
        The certificate and key may be in one file named by both keys.
        """
        directory = self.makeDirectory()
        certificate, key = writeCertificate(directory)
        combined = os.path.join(directory, "combined.pem")
        with open(combined, "wb") as out:
            for name in (certificate, key):
                with open(name, "rb") as f:
                    out.write(f.read())
        config = parseConfig(
            complete(
                f'[tls]\ncertificate = "{combined}"\nprivate_key = "{combined}"\n'
            ),
            "relay.toml",
        )
        self.assertEqual(config.tls.private_key, combined)

    def test_requireTLSWithoutTLSListener(self) -> None:
        """
        C{require_tls} (true by default) with only plain listeners and no
        trusted networks is reported: AUTH could never be offered.
        """
        message = (
            ' [auth] require_tls: is true but every listener has tls = "none", '
            "so AUTH could never be offered; add a TLS listener, set "
            "require_tls = false, or list [relay] trusted_networks"
        )
        self.assertEqual(
            self.problemsOf(complete("[auth]\nrequire_tls = true\n")),
            ["relay.toml:2:" + message],
        )
        self.assertEqual(
            self.problemsOf(complete("[auth]\n")),
            ["relay.toml:" + message],
        )

    def test_requireTLSWithTLSListener(self) -> None:
        """
        C{require_tls} is fine when one listener offers TLS.
        """
        directory = self.makeDirectory()
        certificate, key = writeCertificate(directory)
        config = parseConfig(
            complete(
                f'[tls]\ncertificate = "{certificate}"\nprivate_key = "{key}"\n'
                '[[listener]]\nendpoint = "tcp:port=25"\ntls = "none"\n'
                '[[listener]]\nendpoint = "tcp:port=465"\ntls = "implicit"\n'
                "[auth]\n"
            ),
            "relay.toml",
        )
        self.assertTrue(config.auth.require_tls)


class CheckerTests(ConfigTestCase):
    """
    strcred checkers in C{[auth] checkers}.
    """

    def test_goodCheckers(self) -> None:
        """
        Checkers Twisted can make are kept, in order.
        """
        directory = self.makeDirectory()
        users = os.path.join(directory, "users")
        with open(users, "w") as f:
            f.write("alice:secret\n")
        config = parseConfig(
            complete(
                "[auth]\nrequire_tls = false\n"
                f'checkers = ["memory:bob:pw", "file:{users}"]\n'
            ),
            "relay.toml",
        )
        self.assertEqual(config.auth.checkers, ("memory:bob:pw", f"file:{users}"))

    def test_badCheckers(self) -> None:
        """
        Each checker that cannot be made is reported at its own line: an
        unknown type (with a suggestion when one is close), a file checker
        without a file name or whose file is missing, and a checker that does
        not check passwords.
        """
        text = (
            "[auth]\n"  # 1
            "require_tls = false\n"  # 2
            "checkers = [\n"  # 3
            '  "memory:alice:secret",\n'  # 4
            '  "memroy:alice:secret",\n'  # 5
            '  "file:",\n'  # 6
            '  "file:/nonexistent/users",\n'  # 7
            '  "anonymous",\n'  # 8
            '  "zzzz",\n'  # 9
            "]\n"  # 10
        )
        self.assertEqual(
            self.problemsOf(complete(text)),
            [
                'relay.toml:5: [auth] checkers[1]: "memroy:alice:secret": unknown '
                'checker type "memroy"; did you mean "memory"?',
                "relay.toml:6: [auth] checkers[2]: \"file:\": 'file' requires a "
                "filename",
                'relay.toml:7: [auth] checkers[3]: "file:/nonexistent/users": no such '
                'file "/nonexistent/users"',
                'relay.toml:8: [auth] checkers[4]: "anonymous" does not check '
                "usernames and passwords",
                'relay.toml:9: [auth] checkers[5]: "zzzz": unknown checker type "zzzz"',
            ],
        )


class ManyProblemsTests(ConfigTestCase):
    """
    Every problem is reported, not only the first.
    """

    def test_allProblemsInLineOrder(self) -> None:
        """
        Problems from every section come together, ordered by line, with
        those that have no line last.
        """
        text = (
            "[delivery]\n"  # 1
            'mode = "mxx"\n'  # 2
            "[server]\n"  # 3
            "max_recipients = 0\n"  # 4
            "idle_timeout = false\n"  # 5
            "[relay]\n"  # 6
            'trusted_networks = ["10.1.2.3/16"]\n'  # 7
            "[[listener]]\n"  # 8
            'tls = "none"\n'  # 9
            "[auth]\n"  # 10
            "require_tls = false\n"  # 11
            "[state]\n"  # 12
        )
        self.assertEqual(
            self.problemsOf(text, "/etc/smtpauth-relay/relay.toml"),
            [
                '/etc/smtpauth-relay/relay.toml:2: [delivery] mode: "mxx" is not '
                'one of "smarthost", "mx", "maildir"; did you mean "mx"?',
                "/etc/smtpauth-relay/relay.toml:4: [server] max_recipients: must be a "
                "positive integer, got 0",
                "/etc/smtpauth-relay/relay.toml:5: [server] idle_timeout: expected a "
                "number, got a boolean (false)",
                "/etc/smtpauth-relay/relay.toml:7: [relay] trusted_networks[0]: "
                '"10.1.2.3/16" has host bits set; did you mean "10.1.0.0/16"?',
                "/etc/smtpauth-relay/relay.toml:12: [state]: unknown section",
                "/etc/smtpauth-relay/relay.toml: [listener #1] endpoint: required key "
                "is missing",
            ],
        )


class CheckConfigCommandTests(ConfigTestCase):
    """
    C{smtpauth-relay check-config PATH}.
    """

    def runCommand(self, argv: list[str]) -> tuple[int, str, str]:
        """
        @return: The exit status, standard output and standard error of the
            command run with C{argv}.
        """
        stdout, stderr = io.StringIO(), io.StringIO()
        status = checkConfigCommand(argv, stdout, stderr)
        return status, stdout.getvalue(), stderr.getvalue()

    def test_valid(self) -> None:
        """
        A valid file prints C{PATH: OK} on standard output and exits 0.
        """
        path = self.writeConfig(self.makeDirectory(), complete(""))
        self.assertEqual(self.runCommand([path]), (0, f"{path}: OK\n", ""))

    def test_invalid(self) -> None:
        """
        An invalid file prints each problem on standard error and exits 1.
        """
        path = self.writeConfig(
            self.makeDirectory(), complete("[server]\nmax_recipients = 0\nfoo = 1\n")
        )
        self.assertEqual(
            self.runCommand([path]),
            (
                1,
                "",
                f"{path}:2: [server] max_recipients: must be a positive integer, got 0\n"
                f"{path}:3: [server] foo: unknown key\n",
            ),
        )

    def test_missing(self) -> None:
        """
        A missing file exits 1 with one line.
        """
        path = os.path.join(self.makeDirectory(), "nope.toml")
        self.assertEqual(
            self.runCommand([path]),
            (
                1,
                "",
                f"{path}: cannot read configuration file: No such file or directory\n",
            ),
        )

    def test_usage(self) -> None:
        """
        No path, several paths or an unknown option print the usage on
        standard error and exit 2.
        """
        usage = "usage: smtpauth-relay check-config PATH\n"
        self.assertEqual(self.runCommand([]), (2, "", usage))
        self.assertEqual(self.runCommand(["a.toml", "b.toml"]), (2, "", usage))
        self.assertEqual(
            self.runCommand(["--verbose", "a.toml"]),
            (2, "", "check-config: unknown option --verbose\n" + usage),
        )

    def test_help(self) -> None:
        """
        C{--help} prints the usage on standard output and exits 0.
        """
        self.assertEqual(
            self.runCommand(["--help"]),
            (0, "usage: smtpauth-relay check-config PATH\n", ""),
        )

    def test_dashDash(self) -> None:
        """
        C{--} ends the options: the argument after it is the path.
        """
        path = self.writeConfig(self.makeDirectory(), complete(""))
        self.assertEqual(self.runCommand(["--", path]), (0, f"{path}: OK\n", ""))


class LoggingConfigTests(ConfigTestCase):
    """
    C{[logging]}.
    """

    def test_default(self) -> None:
        """
        Without the section, logs are text.
        """
        config = parseConfig(complete(""), "relay.toml")
        self.assertEqual(config.logging.format, "text")

    def test_json(self) -> None:
        """
        C{format = "json"} is read.
        """
        config = parseConfig(complete('[logging]\nformat = "json"\n'), "relay.toml")
        self.assertEqual(config.logging.format, "json")

    def test_badFormat(self) -> None:
        """
        Another format is refused at its line, with the choices.
        """
        self.assertEqual(
            self.problemsOf(complete('[logging]\nformat = "JSON"\n')),
            [
                'relay.toml:2: [logging] format: "JSON" is not one of "text", '
                '"json"; did you mean "json"?'
            ],
        )


SMARTHOST_OAUTH = (
    '[delivery]\nmode = "smarthost"\nhost = "smtp.example.net"\nauth = "xoauth2"\n'
)


def completeOAuth(text: str) -> str:
    """
    L{complete}, with an C{[auth]} section even though C{text} has an
    C{auth =} key (which L{complete} takes for the section).
    """
    completed = complete(text)
    if "[auth]" in completed:
        return completed
    return completed + "\n" + BASE_SECTIONS["auth"]


class DeliveryOAuth2Tests(ConfigTestCase):
    """
    C{[delivery] auth}, C{[delivery.oauth2]}, C{rewrite_sender} and
    C{rewrite_from}, and the presets in C{etc/examples/}.
    """

    def secretFile(self) -> str:
        path = os.path.join(self.makeDirectory(), "secret")
        with open(path, "w") as f:
            f.write("s3cret\n")
        return path

    def test_defaults(self) -> None:
        """
        Without the new keys the smarthost logs in with a password (or not
        at all) and nothing is rewritten.
        """
        config = parseConfig(completeOAuth(""), "relay.toml")
        self.assertEqual(config.delivery.auth, "password")
        self.assertIsNone(config.delivery.oauth2)
        self.assertEqual(config.delivery.rewrite_sender, "")
        self.assertFalse(config.delivery.rewrite_from)

    def test_clientCredentials(self) -> None:
        """
        A client-credentials table loads; the scope defaults by endpoint.
        """
        secret = self.secretFile()
        config = parseConfig(
            completeOAuth(
                SMARTHOST_OAUTH + "\n[delivery.oauth2]\n"
                'token_endpoint = "https://login.microsoftonline.com/t/oauth2/v2.0/token"\n'
                f'client_id = "app"\nclient_secret_file = "{secret}"\n'
                'username = "relay@example.org"\n'
            ),
            "relay.toml",
        )
        oauth2 = config.delivery.oauth2
        assert oauth2 is not None
        self.assertEqual(config.delivery.auth, "xoauth2")
        self.assertEqual(oauth2.client_secret_file, secret)
        self.assertEqual(oauth2.scope, "https://outlook.office365.com/.default")
        self.assertEqual(oauth2.settings().username, "relay@example.org")

    def test_delegated(self) -> None:
        """
        With a refresh token file (which need not exist yet) the delegated
        scope is the default; the file's directory must exist.
        """
        directory = self.makeDirectory()
        base = (
            'auth = "oauthbearer"\n\n[delivery.oauth2]\n'
            'token_endpoint = "https://login.microsoftonline.com/t/oauth2/v2.0/token"\n'
            'client_id = "app"\nusername = "relay@example.org"\n'
        )
        text = completeOAuth(
            '[delivery]\nmode = "smarthost"\nhost = "smtp.example.net"\n'
            + base
            + f'refresh_token_file = "{directory}/refresh"\n'
        )
        oauth2 = parseConfig(text, "relay.toml").delivery.oauth2
        assert oauth2 is not None
        self.assertEqual(
            oauth2.scope, "https://outlook.office.com/SMTP.Send offline_access"
        )
        self.assertEqual(
            self.problemsOf(
                completeOAuth(
                    '[delivery]\nmode = "smarthost"\nhost = "smtp.example.net"\n'
                    + base
                    + f'refresh_token_file = "{directory}/missing/refresh"\n'
                )
            ),
            [
                "relay.toml:10: [delivery.oauth2] refresh_token_file: the directory "
                f'of "{directory}/missing/refresh" does not exist'
            ],
        )

    def test_problems(self) -> None:
        """
        Each problem names its key and line: a plain-http endpoint, a
        missing key, an unknown key, password keys beside a token login,
        and TLS off.
        """
        secret = self.secretFile()
        problems = self.problemsOf(
            completeOAuth(
                '[delivery]\nmode = "smarthost"\nhost = "smtp.example.net"\n'
                'auth = "xoauth2"\nusername = "relay"\ntls = "none"\n'
                "\n[delivery.oauth2]\n"
                'token_endpoint = "http://login.example.org/token"\n'
                f'client_secret_file = "{secret}"\nusername = "relay@example.org"\n'
                'client_secrett = "x"\n'
            )
        )
        self.assertEqual(
            problems,
            [
                'relay.toml:5: [delivery] username: not used with auth = "xoauth2" '
                "(the mailbox is [delivery.oauth2] username)",
                'relay.toml:6: [delivery] tls: "none" would send the OAuth2 token '
                'unencrypted; use "starttls" or "implicit"',
                'relay.toml:9: [delivery.oauth2] token_endpoint: "http://login.'
                'example.org/token" is not https (plain http only to 127.0.0.1 or '
                "::1, for tests)",
                "relay.toml:12: [delivery.oauth2] client_secrett: unknown key; did "
                'you mean "client_secret_file"?',
                "relay.toml: [delivery.oauth2] client_id: required key is missing",
            ],
        )

    def test_clientAuthentication(self) -> None:
        """
        The client-credentials grant needs a secret or a certificate and
        key, not both; the key must be RSA and match the certificate.
        """
        head = (
            SMARTHOST_OAUTH + "\n[delivery.oauth2]\n"
            'token_endpoint = "https://127.0.0.1/token"\nclient_id = "a"\n'
            'username = "u@example.org"\n'
        )
        self.assertEqual(
            self.problemsOf(completeOAuth(head)),
            [
                "relay.toml: [delivery.oauth2] client_secret_file: the "
                "client-credentials grant (no refresh_token_file) needs "
                "client_secret_file, or certificate and private_key"
            ],
        )
        directory = self.makeDirectory()
        certificate, key = writeCertificate(directory)
        problems = self.problemsOf(
            completeOAuth(
                head + f'certificate = "{certificate}"\nprivate_key = "{key}"\n'
            )
        )
        self.assertEqual(len(problems), 1)
        self.assertIn("is not an RSA key", problems[0])
        secret = self.secretFile()
        problems = self.problemsOf(
            completeOAuth(
                head
                + f'client_secret_file = "{secret}"\ncertificate = "{certificate}"\n'
            )
        )
        self.assertIn("not both", problems[0])

    def test_tableNeeded(self) -> None:
        """
        A token login needs the table, and the table needs a token login.
        """
        self.assertEqual(
            self.problemsOf(completeOAuth(SMARTHOST_OAUTH)),
            [
                'relay.toml: [delivery] oauth2: auth = "xoauth2" needs a '
                "[delivery.oauth2] table"
            ],
        )
        self.assertEqual(
            self.problemsOf(
                completeOAuth(
                    '[delivery]\ndirectory = "/srv/mail"\n\n[delivery.oauth2]\n'
                    'client_id = "x"\n'
                )
            ),
            [
                "relay.toml:4: [delivery] oauth2: [delivery.oauth2] is only used "
                'with auth = "xoauth2" or "oauthbearer"'
            ],
        )

    def test_rewrite(self) -> None:
        """
        C{rewrite_sender} must be an address and is for smarthost mode.
        """
        config = parseConfig(
            completeOAuth(
                '[delivery]\nmode = "smarthost"\nhost = "smtp.example.net"\n'
                'rewrite_sender = "box@example.org"\nrewrite_from = true\n'
            ),
            "relay.toml",
        )
        self.assertEqual(config.delivery.rewrite_sender, "box@example.org")
        self.assertTrue(config.delivery.rewrite_from)
        problems = self.problemsOf(
            completeOAuth('[delivery]\nmode = "mx"\nrewrite_sender = "nobody"\n')
        )
        self.assertEqual(len(problems), 1)
        self.assertIn(
            '[delivery] rewrite_sender: "nobody" is not an address', problems[0]
        )
        self.assertEqual(
            self.problemsOf(
                completeOAuth(
                    '[delivery]\nmode = "mx"\nrewrite_sender = "a@example.org"\n'
                )
            ),
            [
                "relay.toml:3: [delivery] rewrite_sender: only used with mode = "
                '"smarthost"'
            ],
        )

    def presetDirectory(self, name: str) -> str:
        """
        A copy of C{etc/examples/NAME} beside placeholder files for every
        file it names.
        """
        from tests.tokenendpoint import makeAssertionCertificate

        here = os.path.dirname(os.path.abspath(__file__))
        source = os.path.join(here, os.pardir, "etc", "examples", name)
        directory = self.makeDirectory()
        with open(source, encoding="utf-8") as f:
            text = f.read().replace("/etc/smtpauth-relay/", directory + "/")
        self.assertNotIn("/etc/", text.replace("# ", "#").split("#")[0])
        for sub in ("tls", "oauth2"):
            os.mkdir(os.path.join(directory, sub))
        certificate, key = writeCertificate(os.path.join(directory, "tls"))
        os.rename(certificate, os.path.join(directory, "tls", "fullchain.pem"))
        os.rename(key, os.path.join(directory, "tls", "privkey.pem"))
        makeAssertionCertificate(os.path.join(directory, "oauth2"))
        for placeholder in ("users", "oauth2/client-secret"):
            with open(os.path.join(directory, placeholder), "w") as f:
                f.write("placeholder\n")
        self.writeConfig(directory, text)
        return os.path.join(directory, "relay.toml")

    def test_microsoft365Preset(self) -> None:
        """
        etc/examples/microsoft365.toml loads: smtp.office365.com:587 with
        STARTTLS, XOAUTH2, app-only with a certificate, the app-only scope,
        and sender rewriting.
        """
        config = loadConfig(self.presetDirectory("microsoft365.toml"))
        delivery = config.delivery
        oauth2 = delivery.oauth2
        assert oauth2 is not None
        self.assertEqual(
            (delivery.host, delivery.port, delivery.tls, delivery.auth),
            ("smtp.office365.com", 587, "starttls", "xoauth2"),
        )
        self.assertEqual(oauth2.scope, "https://outlook.office365.com/.default")
        self.assertIsNotNone(oauth2.certificate)
        self.assertIsNone(oauth2.refresh_token_file)
        self.assertEqual(delivery.rewrite_sender, oauth2.username)

    def test_googlePreset(self) -> None:
        """
        etc/examples/google.toml loads: smtp.gmail.com:587 with STARTTLS,
        XOAUTH2, a refresh token and Gmail's scope.
        """
        config = loadConfig(self.presetDirectory("google.toml"))
        delivery = config.delivery
        oauth2 = delivery.oauth2
        assert oauth2 is not None
        self.assertEqual(
            (delivery.host, delivery.port, delivery.tls, delivery.auth),
            ("smtp.gmail.com", 587, "starttls", "xoauth2"),
        )
        self.assertEqual(oauth2.token_endpoint, "https://oauth2.googleapis.com/token")
        self.assertEqual(oauth2.scope, "https://mail.google.com/")
        self.assertIsNotNone(oauth2.refresh_token_file)
