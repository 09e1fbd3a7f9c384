"""
C{smtpauth-relay demo}: a relay on 127.0.0.1 that works out of the box.

On first run it writes, under a directory (C{./var} by default): a
self-signed certificate, a password file with the user C{demo} and a random
password, and a configuration with STARTTLS on 2587, implicit TLS on 2465,
the spool and Maildir delivery into C{var/maildir}.  Later runs reuse them.
Then it runs C{twistd -n smtpauth-relay --config var/relay.toml}.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from typing import TextIO

from smtpauth_relay.htpasswd import setUser
from smtpauth_relay.passwords import hashPassword
from smtpauth_relay.tls import generateSelfSigned

DEMO_USER = "demo"

CONFIG_TEMPLATE = """\
# Demo configuration written by "smtpauth-relay demo"; see etc/relay.toml for
# an annotated production example.
[server]
hostname = "localhost"

[tls]
certificate = "tls/cert.pem"
private_key = "tls/key.pem"

[[listener]]
endpoint = "tcp:port={submissionPort}:interface=127.0.0.1"
tls = "starttls"

[[listener]]
endpoint = "tcp:port={submissionsPort}:interface=127.0.0.1"
tls = "implicit"

[auth]
checkers = [{checker}]

[queue]
directory = "spool"

[delivery]
mode = "maildir"
directory = "maildir"
"""


def tomlString(text: str) -> str:
    """
    C{text} as a TOML basic string (its escapes are JSON's).
    """
    return json.dumps(text)


def prepareDemo(
    directory: str, submissionPort: int = 2587, submissionsPort: int = 2465
) -> tuple[str, str]:
    """
    Create the demo files under C{directory} unless they exist.

    @return: the configuration path and the demo user's password.
    """
    directory = os.path.abspath(directory)
    os.makedirs(os.path.join(directory, "tls"), exist_ok=True)
    cert = os.path.join(directory, "tls", "cert.pem")
    key = os.path.join(directory, "tls", "key.pem")
    if not (os.path.exists(cert) and os.path.exists(key)):
        generateSelfSigned(cert, key, "localhost")
    users = os.path.join(directory, "users")
    credentials = os.path.join(directory, "demo-password")
    if os.path.exists(credentials) and os.path.exists(users):
        with open(credentials) as f:
            password = f.read().strip()
    else:
        password = secrets.token_urlsafe(12)
        setUser(users, DEMO_USER, hashPassword(password.encode()))
        fd = os.open(credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
    config = os.path.join(directory, "relay.toml")
    if not os.path.exists(config):
        with open(config, "w") as f:
            f.write(
                CONFIG_TEMPLATE.format(
                    submissionPort=submissionPort,
                    submissionsPort=submissionsPort,
                    checker=tomlString("htpasswd:" + users),
                )
            )
    return config, password


def twistdCommand(arguments: list[str]) -> list[str]:
    """
    The argv that runs C{twistd arguments} with this Python.
    """
    bootstrap = "import sys; from twisted.scripts.twistd import run; run()"
    return [sys.executable, "-c", bootstrap, *arguments]


def demoCommand(argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    """
    C{smtpauth-relay demo [DIRECTORY]}: prepare and run the demo relay.
    """
    if len(argv) > 1:
        stderr.write("usage: smtpauth-relay demo [DIRECTORY]\n")
        return 2
    directory = argv[0] if argv else "var"
    config, password = prepareDemo(directory)
    stdout.write(
        "smtpauth-relay demo\n"
        f"  configuration: {config}\n"
        "  STARTTLS:      127.0.0.1:2587    implicit TLS: 127.0.0.1:2465\n"
        f"  login:         user {DEMO_USER!r}, password {password!r}\n"
        f"  delivered mail goes to {os.path.join(os.path.dirname(config), 'maildir', 'new')}\n"
        "  try: swaks --server 127.0.0.1:2587 --tls --auth PLAIN "
        f"--auth-user {DEMO_USER} --auth-password {password} "
        "--to someone@example.com\n"
    )
    stdout.flush()
    os.execv(
        sys.executable,
        twistdCommand(["-n", "--pidfile=", "smtpauth-relay", "--config", config]),
    )
    return 1  # not reached
