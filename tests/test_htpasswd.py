"""
Tests for L{smtpauth_relay.htpasswd}.
"""

from __future__ import annotations

import io
import os
import stat

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from smtpauth_relay.htpasswd import (
    NEW_FILE_MODE,
    parseHtpasswd,
    passwdCommand,
    setUser,
    validateUsername,
)
from smtpauth_relay.passwords import (
    CRAM_MD5,
    SCRAM_SHA_256,
    hashPassword,
    verifyPassword,
)

HASH_A = "$2b$04$aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
HASH_B = "$2b$04$bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
HASH_C = "$6$salt$" + "c" * 86

# Passwords the policy of smtpauth_relay.passwordpolicy accepts.
STRONG = "vivid quartz lantern"
STRONG2 = "glacier-mint-otter"
STRONG3 = "unicorn velvet tram"


class TTYStringIO(io.StringIO):
    """
    A L{io.StringIO} that says it is a terminal.
    """

    def isatty(self) -> bool:
        return True


class FakeGetpass:
    """
    Answers prompts from a list, recording the prompts.

    @ivar prompts: The prompts seen, in order.
    """

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0)


def eofGetpass(prompt: str) -> str:
    """
    A getpass whose user pressed Ctrl-D.
    """
    raise EOFError()


class ParseHtpasswdTests(SynchronousTestCase):
    """
    Tests for L{parseHtpasswd}.
    """

    def test_entries(self) -> None:
        """
        Each C{user:hash} line gives a user; blank lines, comments and line
        endings (LF or CRLF) are not part of anything.
        """
        data = (
            b"# users of the relay\n"
            b"\n"
            b"alice:" + HASH_A.encode() + b"\r\n"
            b"   \n"
            b"  # indented comment\n"
            b"bob:" + HASH_C.encode() + b"\n"
            b"carol@example.com:" + HASH_B.encode()
        )
        self.assertEqual(
            parseHtpasswd(data, "users"),
            {"alice": HASH_A, "bob": HASH_C, "carol@example.com": HASH_B},
        )

    def test_text(self) -> None:
        """
        The contents may be given as text, and user names may be any UTF-8.
        """
        self.assertEqual(
            parseHtpasswd(f"j\u00fcrgen:{HASH_A}\n", "users"),
            {"j\u00fcrgen": HASH_A},
        )
        self.assertEqual(
            parseHtpasswd(f"j\u00fcrgen:{HASH_A}\n".encode(), "users"),
            {"j\u00fcrgen": HASH_A},
        )

    def test_byteOrderMark(self) -> None:
        """
        A UTF-8 byte order mark (as some Windows editors write) is ignored.
        """
        data = b"\xef\xbb\xbfalice:" + HASH_A.encode() + b"\n"
        self.assertEqual(parseHtpasswd(data, "users"), {"alice": HASH_A})

    def test_caseSensitive(self) -> None:
        """
        User names differing only in case are different users.
        """
        data = f"alice:{HASH_A}\nAlice:{HASH_B}\n"
        self.assertEqual(
            parseHtpasswd(data, "users"), {"alice": HASH_A, "Alice": HASH_B}
        )

    def test_malformed(self) -> None:
        """
        A malformed line is skipped with a warning that names the file and
        the line number, and never quotes the line (which may hold a hash or
        a password).
        """
        lines = [
            f"alice:{HASH_A}",  # 1
            "justapassword",  # 2
            f":{HASH_B}",  # 3
            "nohash:",  # 4
            f"two words:{HASH_B}",  # 5
            f"tab\tname:{HASH_B}",  # 6
            f"bell\x07:{HASH_B}",  # 7
            f"extra:{HASH_B}:1000:1000",  # 8
            f"spaced:{HASH_B} trailing",  # 9
            f"bob:{HASH_C}",  # 10
        ]
        data = "\n".join(lines).encode() + b"\nbad\xff:" + HASH_B.encode() + b"\n"
        with capturedLogs() as events:
            users = parseHtpasswd(data, "/etc/relay/users")
        self.assertEqual(users, {"alice": HASH_A, "bob": HASH_C})
        warned = [e["lineNumber"] for e in events]
        self.assertEqual(warned, [2, 3, 4, 5, 6, 7, 8, 9, 11])
        for event in events:
            self.assertEqual(event["path"], "/etc/relay/users")
            text = formatEvent(event)
            self.assertIn("/etc/relay/users", text)
            self.assertIn(str(event["lineNumber"]), text)
            for secret in ["justapassword", HASH_B, HASH_B[7:20], "1000"]:
                self.assertNotIn(secret, text)

    def test_duplicate(self) -> None:
        """
        When a user appears twice, the first line wins (as in Apache) and the
        second is warned about.
        """
        with capturedLogs() as events:
            users = parseHtpasswd(f"alice:{HASH_A}\nalice:{HASH_B}\n", "users")
        self.assertEqual(users, {"alice": HASH_A})
        self.assertEqual([e["lineNumber"] for e in events], [2])
        self.assertNotIn(HASH_B, formatEvent(events[0]))

    def test_empty(self) -> None:
        """
        An empty file has no users.
        """
        self.assertEqual(parseHtpasswd(b"", "users"), {})


class ValidateUsernameTests(SynchronousTestCase):
    """
    Tests for L{validateUsername}.
    """

    def test_good(self) -> None:
        """
        Ordinary names, addresses and non-ASCII names are accepted.
        """
        for user in ["alice", "alice@example.com", "j\u00fcrgen", "a.b-c_d+e"]:
            validateUsername(user)

    def test_bad(self) -> None:
        """
        Empty names, and names with C{:}, white space or control characters,
        are a L{ValueError}.
        """
        for user in ["", "a:b", "a b", "a\tb", "a\nb", "a\x00b", "a\x7fb", "\u2028"]:
            self.assertRaises(ValueError, validateUsername, user)


class SetUserTests(SynchronousTestCase):
    """
    Tests for L{setUser}.
    """

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "users")

    def write(self, data: bytes, mode: int = 0o600) -> None:
        with open(self.path, "wb") as f:
            f.write(data)
        os.chmod(self.path, mode)

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def test_create(self) -> None:
        """
        A missing file is created, with mode 0640, holding the one user.
        """
        setUser(self.path, "alice", HASH_A)
        self.assertEqual(self.read(), f"alice:{HASH_A}\n".encode())
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), NEW_FILE_MODE)
        self.assertEqual(NEW_FILE_MODE, 0o640)

    def test_add(self) -> None:
        """
        A new user is appended; every existing line, comments and malformed
        lines included, is kept byte for byte, and so is the file's mode.
        """
        original = (
            b"# relay users\r\n"
            b"alice:" + HASH_A.encode() + b"\r\n"
            b"\n"
            b"garbage line\n"
            b"bob:" + HASH_B.encode()
        )
        self.write(original, 0o604)
        setUser(self.path, "carol", HASH_C)
        self.assertEqual(self.read(), original + f"\ncarol:{HASH_C}\n".encode())
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o604)

    def test_replace(self) -> None:
        """
        An existing user's line is replaced where it stands, keeping its line
        ending; other lines and the mode are kept.
        """
        self.write(
            b"# relay users\n"
            b"alice:" + HASH_A.encode() + b"\r\n"
            b"# bob is the boss\n"
            b"bob:" + HASH_B.encode() + b"\n",
            0o640,
        )
        setUser(self.path, "alice", HASH_C)
        self.assertEqual(
            self.read(),
            b"# relay users\n"
            b"alice:" + HASH_C.encode() + b"\r\n"
            b"# bob is the boss\n"
            b"bob:" + HASH_B.encode() + b"\n",
        )
        self.assertEqual(parseHtpasswd(self.read(), self.path)["alice"], HASH_C)

    def test_ownerKept(self) -> None:
        """
        The new file keeps the old one's owner and group, so that root
        editing a C{root:relay} 0640 file does not lock the relay out.
        """
        if os.geteuid() != 0:
            raise SkipTest("only root can give a file away")
        self.write(f"alice:{HASH_A}\n".encode(), 0o640)
        os.chown(self.path, 1, 2)
        setUser(self.path, "bob", HASH_B)
        info = os.stat(self.path)
        self.assertEqual((info.st_uid, info.st_gid), (1, 2))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o640)

    def test_replaceDuplicates(self) -> None:
        """
        If a user appears twice, the first line is replaced and the other
        removed, so the new hash is the one that counts.
        """
        self.write(f"alice:{HASH_A}\nbob:{HASH_B}\nalice:{HASH_B}".encode())
        setUser(self.path, "alice", HASH_C)
        self.assertEqual(self.read(), f"alice:{HASH_C}\nbob:{HASH_B}\n".encode())

    def test_caseSensitive(self) -> None:
        """
        Replacing C{Alice} leaves C{alice} alone.
        """
        self.write(f"alice:{HASH_A}\n".encode())
        setUser(self.path, "Alice", HASH_B)
        self.assertEqual(
            parseHtpasswd(self.read(), self.path),
            {"alice": HASH_A, "Alice": HASH_B},
        )

    def test_atomic(self) -> None:
        """
        The file is replaced by a new one (a new inode) rather than rewritten
        in place, and no temporary file is left behind.
        """
        self.write(f"alice:{HASH_A}\n".encode())
        before = os.stat(self.path).st_ino
        setUser(self.path, "alice", HASH_B)
        self.assertNotEqual(os.stat(self.path).st_ino, before)
        self.assertEqual(os.listdir(self.directory), ["users"])

    def test_symlink(self) -> None:
        """
        A symbolic link is followed: the file it points to is replaced and the
        link stays a link.
        """
        self.write(f"alice:{HASH_A}\n".encode())
        link = os.path.join(self.directory, "link")
        os.symlink("users", link)
        setUser(link, "bob", HASH_B)
        self.assertTrue(os.path.islink(link))
        self.assertEqual(
            parseHtpasswd(self.read(), self.path), {"alice": HASH_A, "bob": HASH_B}
        )

    def test_failureLeavesFile(self) -> None:
        """
        If the new file cannot be written, the old one is untouched and the
        error is raised.
        """
        self.path = os.path.join(self.directory, "missing", "users")
        self.assertRaises(OSError, setUser, self.path, "alice", HASH_A)
        self.assertEqual(os.listdir(self.directory), [])

    def test_badUser(self) -> None:
        """
        User names that would corrupt the file are a L{ValueError}, and the
        file is not touched.
        """
        for user in ["", "a:b", "a b", "a\nb", "a\x00"]:
            self.assertRaises(ValueError, setUser, self.path, user, HASH_A)
        self.assertFalse(os.path.exists(self.path))

    def test_badHash(self) -> None:
        """
        A hash that would corrupt the file is a L{ValueError}.
        """
        for encoded in ["", "a:b", "a\nb", "a b"]:
            self.assertRaises(ValueError, setUser, self.path, "alice", encoded)
        self.assertFalse(os.path.exists(self.path))


class PasswdCommandTests(SynchronousTestCase):
    """
    Tests for L{passwdCommand}, C{smtpauth-relay passwd FILE USER}.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.join(directory, "users")
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()

    def passwd(
        self,
        argv: list[str],
        stdin: io.StringIO,
        getpass: FakeGetpass | None = None,
    ) -> int:
        """
        Run the command with a cheap bcrypt cost.
        """
        if getpass is None:
            getpass = FakeGetpass()
        return passwdCommand(
            argv, stdin, self.stdout, self.stderr, getpass=getpass, rounds=4
        )

    def users(self) -> dict[str, str]:
        with open(self.path, "rb") as f:
            return parseHtpasswd(f.read(), self.path)

    def assertNotLeaked(self, *secrets: str) -> None:
        """
        Neither output mentions any of C{secrets}.
        """
        for secret in secrets:
            self.assertNotIn(secret, self.stdout.getvalue())
            self.assertNotIn(secret, self.stderr.getvalue())

    def test_stdin(self) -> None:
        """
        When stdin is not a terminal, the password is its first line without
        the line ending; it is stored as bcrypt and neither it nor its hash
        is printed.
        """
        getpass = FakeGetpass()
        status = self.passwd(
            [self.path, "alice"],
            io.StringIO(" tangerine obelisk 42 \r\nignored\n"),
            getpass,
        )
        self.assertEqual(status, 0)
        self.assertEqual(getpass.prompts, [])
        encoded = self.users()["alice"]
        self.assertTrue(encoded.startswith("$2b$04$"))
        self.assertTrue(verifyPassword(b" tangerine obelisk 42 ", encoded))
        self.assertIn("alice", self.stdout.getvalue())
        self.assertEqual(self.stderr.getvalue(), "")
        self.assertNotLeaked("tangerine obelisk", encoded, encoded[7:29])

    def test_stdinNoNewline(self) -> None:
        """
        A password without a final newline is taken as it is.
        """
        self.assertEqual(self.passwd([self.path, "alice"], io.StringIO(STRONG)), 0)
        self.assertTrue(verifyPassword(STRONG.encode(), self.users()["alice"]))

    def test_replace(self) -> None:
        """
        Running it again for the same user changes the password and keeps the
        others.
        """
        self.assertEqual(self.passwd([self.path, "alice"], io.StringIO(STRONG)), 0)
        self.assertEqual(self.passwd([self.path, "bob"], io.StringIO(STRONG2)), 0)
        self.assertEqual(self.passwd([self.path, "alice"], io.StringIO(STRONG3)), 0)
        users = self.users()
        self.assertFalse(verifyPassword(STRONG.encode(), users["alice"]))
        self.assertTrue(verifyPassword(STRONG3.encode(), users["alice"]))
        self.assertTrue(verifyPassword(STRONG2.encode(), users["bob"]))

    def test_prompted(self) -> None:
        """
        On a terminal the password is asked for twice with getpass (never
        read from stdin) and stored when both answers match.
        """
        getpass = FakeGetpass("t\u00f6p secret walrus", "t\u00f6p secret walrus")
        stdin = TTYStringIO("not this\n")
        self.assertEqual(self.passwd([self.path, "alice"], stdin, getpass), 0)
        self.assertEqual(len(getpass.prompts), 2)
        self.assertTrue(all("alice" in prompt for prompt in getpass.prompts))
        self.assertTrue(
            verifyPassword("t\u00f6p secret walrus".encode(), self.users()["alice"])
        )
        self.assertNotLeaked("t\u00f6p secret")

    def test_promptMismatch(self) -> None:
        """
        If the two answers differ, nothing is written and the status is 1.
        """
        getpass = FakeGetpass("secret1", "secret2")
        self.assertEqual(self.passwd([self.path, "alice"], TTYStringIO(), getpass), 1)
        self.assertIn("do not match", self.stderr.getvalue())
        self.assertFalse(os.path.exists(self.path))
        self.assertNotLeaked("secret1", "secret2")

    def test_promptEOF(self) -> None:
        """
        Ctrl-D at the prompt gives up with status 1.
        """
        status = passwdCommand(
            [self.path, "alice"],
            TTYStringIO(),
            self.stdout,
            self.stderr,
            getpass=eofGetpass,
            rounds=4,
        )
        self.assertEqual(status, 1)
        self.assertFalse(os.path.exists(self.path))

    def test_emptyRefused(self) -> None:
        """
        An empty password, from stdin or the prompts, is refused with status
        1 and nothing is written.
        """
        self.assertEqual(self.passwd([self.path, "alice"], io.StringIO("\n")), 1)
        self.assertEqual(self.passwd([self.path, "alice"], io.StringIO("")), 1)
        getpass = FakeGetpass("", "")
        self.assertEqual(self.passwd([self.path, "alice"], TTYStringIO(), getpass), 1)
        self.assertIn("empty password", self.stderr.getvalue())
        self.assertFalse(os.path.exists(self.path))

    def test_tooLong(self) -> None:
        """
        A password longer than bcrypt can use is refused with status 1, for
        that reason (not its weakness) and even with C{--force}.
        """
        self.assertEqual(self.passwd([self.path, "alice"], io.StringIO("x" * 73)), 1)
        argv = [self.path, "alice", "--force"]
        self.assertEqual(self.passwd(argv, io.StringIO("x" * 73)), 1)
        self.assertIn("72 bytes", self.stderr.getvalue())
        self.assertNotIn("weak", self.stderr.getvalue())
        self.assertFalse(os.path.exists(self.path))

    def test_badUsername(self) -> None:
        """
        A user name the file cannot hold is a usage error (status 2) and
        nothing is written.
        """
        for user in ["a:b", "a b", "a\x01b", ""]:
            self.assertEqual(self.passwd([self.path, user], io.StringIO("pw\n")), 2)
        self.assertIn("invalid user name", self.stderr.getvalue())
        self.assertFalse(os.path.exists(self.path))

    def test_usage(self) -> None:
        """
        Anything but two arguments (and C{--force}) is a usage error (status
        2) with the usage on stderr; C{--help} prints it on stdout with status
        0, and says what C{--force} does.
        """
        for argv in [
            [],
            [self.path],
            [self.path, "alice", "extra"],
            ["-x", "a"],
            ["--force"],
            [self.path, "--force"],
            [self.path, "--force", "alice", "extra"],
        ]:
            self.assertEqual(self.passwd(argv, io.StringIO(STRONG)), 2)
        self.assertIn(
            "usage: smtpauth-relay passwd [--scheme bcrypt|scram-sha-256|cram-md5]"
            " [--iterations N] FILE USER [--force]\n",
            self.stderr.getvalue(),
        )
        self.assertEqual(self.passwd(["--help"], io.StringIO()), 0)
        self.assertIn("usage:", self.stdout.getvalue())
        self.assertIn("--force", self.stdout.getvalue())
        self.assertFalse(os.path.exists(self.path))

    def test_unwritable(self) -> None:
        """
        If the file cannot be written, the status is 1 with the reason on
        stderr.
        """
        path = os.path.join(self.path, "nodir", "users")
        self.assertEqual(self.passwd([path, "alice"], io.StringIO(STRONG + "\n")), 1)
        self.assertIn("cannot update", self.stderr.getvalue())
        self.assertNotLeaked(STRONG, "$2b$")

    def test_weakRefused(self) -> None:
        """
        A weak password is refused with status 1, every reason on stderr and
        a hint about C{--force}; nothing is written, and neither the password
        nor its hash is printed.
        """
        status = self.passwd([self.path, "alice"], io.StringIO("qwerty123\n"))
        self.assertEqual(status, 1)
        self.assertEqual(self.stdout.getvalue(), "")
        self.assertEqual(
            self.stderr.getvalue(),
            "smtpauth-relay passwd: weak password refused:\n"
            "  - it is shorter than 12 characters\n"
            "  - it is too easy to guess (strength 0 of 4, 3 needed):"
            " This is a very common password."
            " Add another word or two. Uncommon words are better.\n"
            "Choose another, or give --force to set it anyway.\n",
        )
        self.assertFalse(os.path.exists(self.path))
        self.assertNotLeaked("qwerty123", "$2b$")

    def test_weakPromptedRefused(self) -> None:
        """
        A weak password typed at the prompts is refused too, leaving an
        existing file as it was.
        """
        self.assertEqual(self.passwd([self.path, "alice"], io.StringIO(STRONG)), 0)
        with open(self.path, "rb") as f:
            before = f.read()
        getpass = FakeGetpass("qwerty123", "qwerty123")
        self.assertEqual(self.passwd([self.path, "alice"], TTYStringIO(), getpass), 1)
        self.assertEqual(len(getpass.prompts), 2)
        self.assertIn("weak password refused", self.stderr.getvalue())
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_userNameRefused(self) -> None:
        """
        A password containing the user name is refused, however strong
        otherwise.
        """
        argv = [self.path, "alice"]
        self.assertEqual(self.passwd(argv, io.StringIO("kumquat-alice-quarry")), 1)
        self.assertIn("  - it contains the user name\n", self.stderr.getvalue())
        self.assertFalse(os.path.exists(self.path))

    def test_addressDomainRefused(self) -> None:
        """
        For a user name that looks like an address, a password containing
        its domain is refused; for a plain user name no domain counts.
        """
        password = "kumquat example quarry"
        argv = [self.path, "bob@example.org"]
        self.assertEqual(self.passwd(argv, io.StringIO(password)), 1)
        self.assertIn(
            '  - it contains "example", from the domain example.org\n',
            self.stderr.getvalue(),
        )
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(self.passwd([self.path, "bob"], io.StringIO(password)), 0)
        self.assertTrue(verifyPassword(password.encode(), self.users()["bob"]))

    def test_force(self) -> None:
        """
        With C{--force}, anywhere on the command line, a weak password is set
        with a warning giving the reasons on stderr, and status 0.
        """
        for i, argv in enumerate(
            [
                ["--force", self.path, "user0"],
                [self.path, "--force", "user1"],
                [self.path, "user2", "--force"],
            ]
        ):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            self.assertEqual(self.passwd(argv, io.StringIO("qwerty123\n")), 0)
            self.assertTrue(verifyPassword(b"qwerty123", self.users()[f"user{i}"]))
            warning = self.stderr.getvalue()
            self.assertTrue(
                warning.startswith(
                    "smtpauth-relay passwd: warning: setting a weak password"
                    " (--force):\n"
                    "  - it is shorter than 12 characters\n"
                ),
                warning,
            )
            self.assertNotIn("refused", warning)
        self.assertIn("Password for user2 set", self.stdout.getvalue())
        self.assertNotLeaked("qwerty123")

    def test_strongAccepted(self) -> None:
        """
        A strong password is set without a word on stderr, with or without
        C{--force}.
        """
        self.assertEqual(self.passwd([self.path, "alice"], io.StringIO(STRONG)), 0)
        argv = [self.path, "bob@example.org", "--force"]
        self.assertEqual(self.passwd(argv, io.StringIO(STRONG2)), 0)
        self.assertEqual(self.stderr.getvalue(), "")
        users = self.users()
        self.assertTrue(verifyPassword(STRONG.encode(), users["alice"]))
        self.assertTrue(verifyPassword(STRONG2.encode(), users["bob@example.org"]))


class SASLSchemeTests(SynchronousTestCase):
    """
    SCRAM-SHA-256 and C{{CRAM-MD5}} entries in password files, and
    C{passwd --scheme}.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.join(directory, "users")
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()

    def passwd(self, argv: list[str], password: str = STRONG) -> int:
        return passwdCommand(
            argv, io.StringIO(password), self.stdout, self.stderr, rounds=4
        )

    def users(self) -> dict[str, str]:
        with open(self.path, "rb") as f:
            return parseHtpasswd(f.read(), self.path)

    def test_scramEntryParsed(self) -> None:
        """
        PostgreSQL's SCRAM layout holds two C{:}: it is one hash, not extra
        fields; other hashes with C{:} are still malformed.
        """
        scram = hashPassword(b"pencil", scheme=SCRAM_SHA_256, iterations=4096)
        data = f"alice:{scram}\nbob:{HASH_A}:x\ncarol:SCRAM-SHA-256$1:2:3:4\n"
        self.assertEqual(parseHtpasswd(data, "users"), {"alice": scram})

    def test_setUserScram(self) -> None:
        """
        L{setUser} stores SCRAM and CRAM-MD5 hashes and reads them back.
        """
        scram = hashPassword(b"pencil", scheme=SCRAM_SHA_256, iterations=4096)
        cram = hashPassword(b"pencil", scheme=CRAM_MD5)
        setUser(self.path, "alice", scram)
        setUser(self.path, "bob", cram)
        self.assertEqual(self.users(), {"alice": scram, "bob": cram})
        self.assertRaises(ValueError, setUser, self.path, "carol", "a:b")

    def test_passwdScram(self) -> None:
        """
        C{--scheme scram-sha-256} stores SCRAM keys with 10,000 iterations
        by default, which verify the password; nothing secret is printed.
        """
        self.assertEqual(
            self.passwd(["--scheme", "scram-sha-256", self.path, "alice"]), 0
        )
        encoded = self.users()["alice"]
        self.assertTrue(encoded.startswith("SCRAM-SHA-256$10000:"), encoded)
        self.assertTrue(verifyPassword(STRONG.encode(), encoded))
        self.assertEqual(self.stderr.getvalue(), "")
        self.assertNotIn(encoded.split("$")[2][:20], self.stdout.getvalue())

    def test_passwdIterations(self) -> None:
        """
        C{--iterations} sets the SCRAM iteration count; fewer than 4096,
        garbage, or with another scheme is a usage error.
        """
        argv = ["--scheme=SCRAM-SHA-256", "--iterations", "4096", self.path, "a"]
        self.assertEqual(self.passwd(argv), 0)
        self.assertTrue(self.users()["a"].startswith("SCRAM-SHA-256$4096:"))
        for bad in (
            ["--scheme", "scram-sha-256", "--iterations", "4095", self.path, "a"],
            ["--scheme", "scram-sha-256", "--iterations", "many", self.path, "a"],
            ["--scheme", "scram-sha-256", "--iterations", self.path, "a"],
            ["--iterations", "5000", self.path, "a"],
            ["--scheme", "md5", self.path, "a"],
            ["--scheme", "bcrypt", "--scheme", "bcrypt", self.path, "a"],
            ["--scheme"],
        ):
            self.assertEqual(self.passwd(bad), 2, bad)

    def test_passwdCramMD5(self) -> None:
        """
        C{--scheme cram-md5} stores Dovecot's C{{CRAM-MD5}} state.
        """
        self.assertEqual(self.passwd(["--scheme", "cram-md5", self.path, "bob"]), 0)
        encoded = self.users()["bob"]
        self.assertRegex(encoded, r"\A\{CRAM-MD5\}[0-9a-f]{64}\Z")
        self.assertTrue(verifyPassword(STRONG.encode(), encoded))

    def test_policyStillApplies(self) -> None:
        """
        The password policy applies whatever the scheme.
        """
        argv = ["--scheme", "scram-sha-256", self.path, "alice"]
        self.assertEqual(self.passwd(argv, "password"), 1)
        self.assertIn("weak password refused", self.stderr.getvalue())
        self.assertFalse(os.path.exists(self.path))

    def test_saslprepRefused(self) -> None:
        """
        A password SCRAM clients could not use (refused by SASLprep) is
        refused for SCRAM even with C{--force}, without quoting it.
        """
        argv = ["--scheme", "scram-sha-256", self.path, "alice", "--force"]
        self.assertEqual(self.passwd(argv, "vivid\u0007quartz lantern"), 1)
        self.assertIn("SASLprep", self.stderr.getvalue())
        self.assertNotIn("quartz", self.stderr.getvalue())
        self.assertFalse(os.path.exists(self.path))
