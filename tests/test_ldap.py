"""
Tests for L{smtpauth_relay.ldapchecker} and the C{ldap} strcred plugin.

The escaping, argument parsing and protocol tests run anywhere; the login
tests run against a real OpenLDAP server (L{tests.slapd_support}) and are
skipped when slapd is not installed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ldaptor.protocols import pureber, pureldap
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import findCheckerFactory, makeChecker
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from smtpauth_relay.errors import CheckerUnavailable, UnknownUser
from smtpauth_relay.ldapchecker import (
    LDAPChecker,
    LDAPConnection,
    _fillDN,
    _fillFilter,
    _filterTemplate,
    escapeDNValue,
    escapeFilterValue,
    parseArgument,
)
from smtpauth_relay.testing import CheckerContractMixin
from tests.e2e_support import HOST, freePorts
from tests.plugin_support import (
    assertCheckerFactory,
    checkerMadeAlone,
    pluginImports,
)
from tests.slapd_support import (
    AD_USERS,
    ADMIN_ALICE_PASSWORD,
    OTHER_HOST,
    PEOPLE,
    SERVICE_DN,
    SERVICE_PASSWORD,
    SUFFIX,
    TWIN_PASSWORD,
    Slapd,
    sharedSlapd,
    slapdMissing,
)

DN_TEMPLATE = f"uid=%s,{PEOPLE}"
AD_FILTER = "(&(objectClass=testADAccount)(sAMAccountName=%s))"

_requestDecoder = pureldap.LDAPBERDecoderContext_TopLevel(
    inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
        fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
        inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
    )
)


def decodeMessages(data: bytes) -> list[Any]:
    """
    The LDAP messages in C{data}, as a server would decode them.
    """
    messages = []
    while data:
        message, used = pureber.berDecodeObject(_requestDecoder, data)
        messages.append(message)
        data = data[used:]
    return messages


def answer(operation: Any, messageId: int) -> bytes:
    """
    C{operation} (a response) encoded as the answer to message
    C{messageId}.
    """
    return bytes(pureldap.LDAPMessage(operation, id=messageId).toWire())


def credentials(username: str, password: str) -> UsernamePassword:
    return UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))


def logText(events: Sequence[LogEvent]) -> str:
    return "\n".join(formatEvent(e) for e in events)


# -- escaping -----------------------------------------------------------------


class EscapeTests(SynchronousTestCase):
    """
    Tests for L{escapeDNValue} (RFC 4514) and L{escapeFilterValue} (RFC 4515).
    """

    def test_dnExamples(self) -> None:
        """
        The RFC 4514 section 4 examples' values come out escaped as there
        (hex escapes for control characters, backslashes for specials).
        """
        self.assertEqual(
            escapeDNValue('James "Jim" Smith, III'), 'James \\"Jim\\" Smith\\, III'
        )
        self.assertEqual(escapeDNValue("Before\rAfter"), "Before\\0dAfter")
        self.assertEqual(escapeDNValue("Sales+CN=J. Smith"), "Sales\\+CN\\=J. Smith")
        self.assertEqual(escapeDNValue("Lučić"), "Lučić")

    def test_dnSpecials(self) -> None:
        """
        Every character special in a DN value is escaped: C{,+"\\<>;=}
        anywhere, C{#} and space at the start, space at the end, NUL.
        """
        self.assertEqual(
            escapeDNValue('a,b+c"d\\e<f>g;h=i'), 'a\\,b\\+c\\"d\\\\e\\<f\\>g\\;h\\=i'
        )
        self.assertEqual(escapeDNValue("#x#"), "\\#x#")
        self.assertEqual(escapeDNValue(" x x "), "\\ x x\\ ")
        self.assertEqual(escapeDNValue(" "), "\\ ")
        self.assertEqual(escapeDNValue("a\x00b"), "a\\00b")
        self.assertEqual(escapeDNValue(""), "")

    def test_filterExamples(self) -> None:
        """
        The RFC 4515 section 4 examples' values come out escaped as there.
        """
        self.assertEqual(
            escapeFilterValue("Parens R Us (for all your parenthetical needs)"),
            "Parens R Us \\28for all your parenthetical needs\\29",
        )
        self.assertEqual(escapeFilterValue("*"), "\\2a")
        self.assertEqual(escapeFilterValue("C:\\MyFile"), "C:\\5cMyFile")
        self.assertEqual(escapeFilterValue("\x00\x00\x00\x04"), "\\00\\00\\00\\04")
        self.assertEqual(escapeFilterValue("Lučić"), "Lučić")

    def test_filterInjection(self) -> None:
        """
        The usual injection attempts lose every special character.
        """
        self.assertEqual(escapeFilterValue("*)(uid=*"), "\\2a\\29\\28uid=\\2a")
        self.assertEqual(
            escapeFilterValue("alice)(|(uid=*"), "alice\\29\\28|\\28uid=\\2a"
        )
        self.assertEqual(escapeFilterValue("a\tb\n"), "a\\09b\\0a")

    def test_fillDN(self) -> None:
        """
        The escaped name replaces C{%s} and C{{user}}, in one pass: a
        placeholder inside the name itself is left as it is.
        """
        self.assertEqual(
            _fillDN("uid=%s,ou=people", "alice,ou=admins"),
            "uid=alice\\,ou\\=admins,ou=people",
        )
        self.assertEqual(_fillDN("uid={user},o=x", "bob"), "uid=bob,o=x")
        self.assertEqual(_fillDN("uid=%s,o=x", "{user}%s"), "uid={user}%s,o=x")


class FilterTemplateTests(SynchronousTestCase):
    """
    Tests for the filter template: parsed once, the user name put into the
    parsed equality assertion.
    """

    def test_nameIsOpaque(self) -> None:
        """
        A user name full of filter syntax becomes the literal value of the
        equality assertion: the filter sent is the one that the escaped
        name gives, with the same structure as the template.
        """
        template = _filterTemplate(AD_FILTER)
        for name in ["*)(uid=*", "alice)(|(uid=*", "*", "a\\2a", "x\ty", "é\x00"]:
            filled = _fillFilter(template, name)
            expected = pureldap.LDAPFilter_and(
                [
                    pureldap.LDAPFilter_equalityMatch(
                        attributeDesc=pureldap.LDAPAttributeDescription("objectClass"),
                        assertionValue=pureldap.LDAPAssertionValue("testADAccount"),
                    ),
                    pureldap.LDAPFilter_equalityMatch(
                        attributeDesc=pureldap.LDAPAttributeDescription(
                            "sAMAccountName"
                        ),
                        assertionValue=pureldap.LDAPAssertionValue(name),
                    ),
                ]
            )
            self.assertEqual(filled.toWire(), expected.toWire(), name)

    def test_surroundingText(self) -> None:
        """
        The placeholder may be part of a value, and may appear in several.
        """
        filled = _fillFilter(
            _filterTemplate("(|(mail=%s@example.org)(uid={user}))"), "a*"
        )
        values = [f.assertionValue.value for f in filled.data]
        self.assertEqual(values, ["a*@example.org", "a*"])

    def test_negation(self) -> None:
        """
        A placeholder under C{(!...)} is filled too.
        """
        filled = _fillFilter(_filterTemplate("(&(uid=%s)(!(cn=%s)))"), "z")
        self.assertEqual(filled.data[1].value.assertionValue.value, "z")

    def test_invalidTemplates(self) -> None:
        """
        A template without placeholder, one that does not parse, or one with
        the placeholder anywhere but in an equality value is refused,
        naming C{filter}.
        """
        for template in [
            "(uid=alice)",
            "(uid=%s",
            "uid=%s)",
            "(%s=alice)",
            "(uid=*%s*)",
            "(uid>=%s)",
            "(uid:caseExactMatch:=%s)",
        ]:
            error = self.assertRaises(ValueError, _filterTemplate, template)
            self.assertTrue(str(error).startswith("filter:"), str(error))


# -- argument -----------------------------------------------------------------


class ParseArgumentTests(SynchronousTestCase):
    """
    Tests for L{parseArgument}: the URL and its options.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.passwordFile = os.path.join(directory, "ldap.pass")
        with open(self.passwordFile, "w") as f:
            f.write("service secret\nsecond line\n")
        self.caFile = os.path.join(directory, "ca.pem")
        from tests.upstream_support import CertificateAuthority

        self.caFile = CertificateAuthority(directory).certificatePath
        self.directory = directory

    def assertOptionError(self, argstring: str, option: str, *fragments: str) -> None:
        """
        Parsing C{argstring} raises a L{ValueError} naming C{option} first.
        """
        error = self.assertRaises(ValueError, parseArgument, argstring)
        self.assertTrue(str(error).startswith(option + ":"), f"{argstring!r}: {error}")
        for fragment in fragments:
            self.assertIn(fragment, str(error))

    def test_dnTemplate(self) -> None:
        """
        The OpenLDAP example: C{ldaps://}, port 636, a DN template whose
        C{%s} survives the percent-decoding, the default timeout.
        """
        settings = parseArgument(
            "ldaps://ldap.example.org/?dn=uid=%s,ou=people,dc=example,dc=org"
        )
        self.assertEqual(settings.host, "ldap.example.org")
        self.assertEqual(settings.port, 636)
        self.assertEqual(settings.tls, "ldaps")
        self.assertEqual(settings.dnTemplate, "uid=%s,ou=people,dc=example,dc=org")
        self.assertIsNone(settings.base)
        self.assertEqual(settings.timeout, 10.0)
        self.assertEqual(settings.url, "ldaps://ldap.example.org/")

    def test_activeDirectory(self) -> None:
        """
        The Active Directory example: StartTLS on port 389, search with a
        service account whose password is the first line of its file, a
        filter with C{&} in it, a CA file.
        """
        settings = parseArgument(
            "ldap://dc1.example.org/?starttls=yes&base=dc=example,dc=org"
            "&filter=(&(objectClass=user)(sAMAccountName=%s))"
            "&bind_dn=cn=relay,cn=Users,dc=example,dc=org"
            f"&bind_password_file={self.passwordFile}&ca_file={self.caFile}"
            "&timeout=2.5&scope=one"
        )
        self.assertEqual(settings.port, 389)
        self.assertEqual(settings.tls, "starttls")
        self.assertEqual(settings.base, "dc=example,dc=org")
        self.assertEqual(
            settings.filterTemplate, "(&(objectClass=user)(sAMAccountName=%s))"
        )
        self.assertEqual(settings.bindDN, "cn=relay,cn=Users,dc=example,dc=org")
        self.assertEqual(settings.bindPassword, b"service secret")
        self.assertEqual(settings.caFile, self.caFile)
        self.assertEqual(settings.timeout, 2.5)
        self.assertEqual(settings.scope, "one")
        self.assertNotIn("service secret", repr(settings))

    def test_percentDecoding(self) -> None:
        """
        Values are percent-decoded (C{%26} is an C{&}, C{%25} a C{%}), but
        C{%s} and C{{user}} are placeholders, not escapes; the port and an
        IPv6 literal are taken from the URL.
        """
        settings = parseArgument(
            "ldaps://[::1]:1636?dn=cn=%s%26{user}%2541,o=x&timeout=1"
        )
        self.assertEqual(settings.dnTemplate, "cn=%s&{user}%41,o=x")
        self.assertEqual(settings.host, "::1")
        self.assertEqual(settings.port, 1636)

    def test_insecureLoopback(self) -> None:
        """
        Plain C{ldap://} is allowed with C{insecure=yes} to a loopback
        address.
        """
        for host in ["127.0.0.1", "localhost", "[::1]", "127.1.2.3"]:
            settings = parseArgument(f"ldap://{host}:3389/?insecure=yes&dn=uid=%s")
            self.assertEqual(settings.tls, "none")

    def test_url(self) -> None:
        """
        The URL must be C{ldap://} or C{ldaps://}, name a host and a valid
        port, and hold no credentials nor path (the base is an option).
        """
        self.assertOptionError("http://x/?dn=%s", "url", "ldaps://")
        self.assertOptionError("ldaps:///?dn=%s", "url", "no host")
        self.assertOptionError("ldaps://x:99999/?dn=%s", "url")
        self.assertOptionError("ldaps://x:0/?dn=%s", "url")
        self.assertOptionError("ldaps://u:p@x/?dn=%s", "url", "bind_password_file")
        self.assertOptionError(
            "ldaps://x/dc=example,dc=org??sub?(uid=%s)", "url", "base="
        )
        self.assertOptionError(
            "ldaps://x/?dn=uid=%s&bogus=1", "bogus", "unknown option"
        )
        self.assertOptionError("ldaps://x/?dn=uid=%s&dn=cn=%s", "dn", "twice")
        self.assertOptionError("ldaps://x/?dn=", "dn", "empty")

    def test_cleartextRefused(self) -> None:
        """
        Plain C{ldap://} without C{starttls=yes} is refused unless
        C{insecure=yes}, and that only to a loopback address.
        """
        self.assertOptionError("ldap://x/?dn=uid=%s", "starttls", "unencrypted")
        self.assertOptionError(
            "ldap://192.0.2.1/?dn=uid=%s&insecure=yes", "insecure", "loopback"
        )
        self.assertOptionError(
            "ldap://ldap.example.org/?dn=uid=%s&insecure=yes", "insecure"
        )
        self.assertOptionError(
            "ldaps://127.0.0.1/?dn=uid=%s&insecure=yes", "insecure", "verified"
        )
        self.assertOptionError(
            "ldap://127.0.0.1/?dn=uid=%s&insecure=yes&starttls=yes", "insecure"
        )

    def test_booleans(self) -> None:
        """
        C{starttls} and C{insecure} take yes or no; StartTLS is for
        C{ldap://} only.
        """
        self.assertOptionError("ldap://x/?dn=uid=%s&starttls=maybe", "starttls")
        self.assertOptionError("ldap://x/?dn=uid=%s&insecure=2", "insecure")
        self.assertOptionError("ldaps://x/?dn=uid=%s&starttls=yes", "starttls")
        self.assertEqual(
            parseArgument("ldap://x/?dn=uid=%s&starttls=TRUE&insecure=no").tls,
            "starttls",
        )

    def test_caFile(self) -> None:
        """
        C{ca_file} must hold a PEM certificate, and needs TLS.
        """
        missing = os.path.join(self.directory, "missing.pem")
        self.assertOptionError(f"ldaps://x/?dn=uid=%s&ca_file={missing}", "ca_file")
        self.assertOptionError(
            f"ldaps://x/?dn=uid=%s&ca_file={self.passwordFile}",
            "ca_file",
            "no usable PEM certificate",
        )
        self.assertOptionError(
            f"ldap://127.0.0.1/?dn=uid=%s&insecure=yes&ca_file={self.caFile}",
            "ca_file",
        )

    def test_timeout(self) -> None:
        """
        C{timeout} is a number of seconds, more than 0 and at most an hour.
        """
        for value in ["0", "-1", "abc", "nan", "inf", "3601"]:
            self.assertOptionError(f"ldaps://x/?dn=uid=%s&timeout={value}", "timeout")

    def test_mode(self) -> None:
        """
        Either C{dn=} with a placeholder, or C{base=} and C{filter=} (with
        C{scope}, C{bind_dn} and C{bind_password_file} only then, the last
        two together).
        """
        self.assertOptionError("ldaps://x/", "base", "dn=")
        self.assertOptionError("ldaps://x/?dn=uid=alice", "dn", "placeholder")
        self.assertOptionError("ldaps://x/?dn=uid=%s&base=o=x", "base", "not with dn=")
        self.assertOptionError("ldaps://x/?dn=uid=%s&scope=one", "scope")
        self.assertOptionError("ldaps://x/?dn=uid=%s&bind_dn=cn=x", "bind_dn")
        self.assertOptionError("ldaps://x/?base=o=x", "filter", "required")
        self.assertOptionError("ldaps://x/?filter=(uid=%s)", "base", "required")
        self.assertOptionError("ldaps://x/?base=o=x&filter=(uid=x)", "filter")
        self.assertOptionError("ldaps://x/?base=o=x&filter=(uid=%s", "filter")
        self.assertOptionError(
            "ldaps://x/?base=o=x&filter=(uid=%s)&scope=base", "scope"
        )
        self.assertOptionError(
            "ldaps://x/?base=o=x&filter=(uid=%s)&bind_dn=cn=x", "bind_password_file"
        )
        self.assertOptionError(
            f"ldaps://x/?base=o=x&filter=(uid=%s)&bind_password_file={self.passwordFile}",
            "bind_dn",
        )
        settings = parseArgument("ldaps://x/?base=o=x&filter=(uid=%s)")
        self.assertIsNone(settings.bindDN)
        self.assertEqual(settings.scope, "sub")

    def test_passwordFile(self) -> None:
        """
        The service account's password file must exist and its first line
        must not be empty; a CRLF ending is not part of the password.
        """
        base = "ldaps://x/?base=o=x&filter=(uid=%s)&bind_dn=cn=x&bind_password_file="
        self.assertOptionError(
            base + os.path.join(self.directory, "missing"), "bind_password_file"
        )
        empty = os.path.join(self.directory, "empty")
        with open(empty, "w") as f:
            f.write("\nsecret\n")
        self.assertOptionError(base + empty, "bind_password_file", "empty")
        crlf = os.path.join(self.directory, "crlf")
        with open(crlf, "wb") as f:
            f.write(b"s3cret\r\n")
        self.assertEqual(parseArgument(base + crlf).bindPassword, b"s3cret")


# -- plugin -------------------------------------------------------------------


class LDAPPluginTests(SynchronousTestCase):
    """
    Tests for the C{ldap} strcred plugin.
    """

    def test_found(self) -> None:
        """
        strcred finds the plugin by its name, and it provides
        L{ICheckerFactory} and L{IPlugin}.
        """
        assertCheckerFactory(self, "ldap", "starttls", ["IUsernamePassword"])

    def test_generateChecker(self) -> None:
        """
        C{--auth ldap:URL} gives an L{LDAPChecker} for that server, which
        provides L{ICredentialsChecker} and has the C{timeout} option as its
        C{timeout}.
        """
        checker = makeChecker(
            "ldap:ldaps://ldap.example.org/?dn=uid=%s,ou=people,dc=example,dc=org"
            "&timeout=3"
        )
        self.assertIsInstance(checker, LDAPChecker)
        assert isinstance(checker, LDAPChecker)
        self.assertTrue(verifyObject(ICredentialsChecker, checker))
        self.assertEqual(checker.timeout, 3.0)
        self.assertEqual(checker.settings.host, "ldap.example.org")

    def test_errors(self) -> None:
        """
        An empty or invalid argument is a L{ValueError} that says it is
        about C{ldap} and names the option.
        """
        factory = findCheckerFactory("ldap")
        error = self.assertRaises(ValueError, factory.generateChecker, " ")
        self.assertIn("requires the LDAP server's URL", str(error))
        error = self.assertRaises(
            ValueError, factory.generateChecker, "ldaps://x/?dn=uid=%s&timeout=0"
        )
        self.assertTrue(str(error).startswith("ldap: timeout:"), str(error))

    def test_thin(self) -> None:
        """
        Importing the plugin file (as every twistd run does) imports neither
        the checker nor ldaptor nor the reactor.
        """
        imported = pluginImports(
            "smtpauth_relay_ldap",
            ["smtpauth_relay.ldapchecker", "ldaptor", "twisted.internet.reactor"],
        )
        self.assertEqual(imported, [])

    def test_noReactorInstalled(self) -> None:
        """
        Making a checker (as C{check-config} does) does not import the global
        reactor, which would install one behind twistd's back.
        """
        output = checkerMadeAlone(
            "ldap:ldaps://ldap.example.org/?base=o=x&filter=(uid=%s)"
        )
        self.assertEqual(output, "LDAPChecker False")


# -- the checker in memory ----------------------------------------------------


class MemoryServer:
    """
    The server end of the checker's connection on a L{MemoryReactorClock}:
    what the checker sent, decoded, and a way to answer.
    """

    def __init__(self, reactor: MemoryReactorClock, index: int = -1) -> None:
        host, port, factory, timeout, bindAddress = reactor.tcpClients[index]
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        self.protocol = protocol
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def received(self) -> list[Any]:
        """
        The messages the checker sent since the last call.
        """
        data = self.transport.value()
        self.transport.clear()
        return decodeMessages(data)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def close(self) -> None:
        from twisted.internet.error import ConnectionDone

        self.protocol.connectionLost(Failure(ConnectionDone()))


class CheckerInMemoryTests(SynchronousTestCase):
    """
    Tests for L{LDAPChecker} talking to a scripted server in memory (plain
    C{ldap://} to loopback).
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def checker(self, options: str) -> LDAPChecker:
        return LDAPChecker(
            parseArgument(f"ldap://127.0.0.1:3389/?insecure=yes&{options}"),
            self.reactor,
        )

    def test_emptyPasswordNeverSent(self) -> None:
        """
        An empty password is a wrong password, and the checker does not
        even connect: a bind with it would be an unauthenticated bind.
        """
        checker = self.checker("dn=uid=%s,o=x")
        with capturedLogs() as events:
            failure = self.failureResultOf(
                checker.requestAvatarId(credentials("alice", "")), UnauthorizedLogin
            )
        self.assertNotIsInstance(failure.value, UnknownUser)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertIn("empty password", logText(events))

    def test_badNames(self) -> None:
        """
        A user name that is not UTF-8 is a wrong password; an empty one, one
        with leading or trailing spaces (which the directory would ignore)
        or with control characters is an unknown user; none connects.
        """
        checker = self.checker("dn=uid=%s,o=x")
        failure = self.failureResultOf(
            checker.requestAvatarId(UsernamePassword(b"\xff", b"pw")), UnauthorizedLogin
        )
        self.assertNotIsInstance(failure.value, UnknownUser)
        for name in ["", " alice", "alice ", "ali\nce", "alice\x00", "\t"]:
            self.failureResultOf(
                checker.requestAvatarId(credentials(name, "pw")), UnknownUser
            )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_bindOnTheWire(self) -> None:
        """
        In DN-template mode the checker binds (LDAPv3, simple) as the DN
        with the escaped name and the password, then unbinds and closes.
        """
        checker = self.checker("dn=uid=%s,ou=people,o=x")
        d = checker.requestAvatarId(credentials("alice,ou=admins", "pa ss"))
        server = MemoryServer(self.reactor)
        [bind] = server.received()
        self.assertIsInstance(bind.value, pureldap.LDAPBindRequest)
        self.assertEqual(bind.value.dn, b"uid=alice\\,ou\\=admins,ou=people,o=x")
        self.assertEqual(bind.value.auth, b"pa ss")
        self.assertEqual(bind.value.version, 3)
        server.send(answer(pureldap.LDAPBindResponse(resultCode=0), bind.id))
        [unbind] = server.received()
        self.assertIsInstance(unbind.value, pureldap.LDAPUnbindRequest)
        self.assertTrue(server.transport.disconnecting)
        self.assertNoResult(d)
        server.close()
        self.assertEqual(self.successResultOf(d), "alice,ou=admins")

    def test_searchOnTheWire(self) -> None:
        """
        In search mode the checker binds as the service account, searches
        for the user (size limit 2, no attributes, aliases not followed,
        the name as the literal assertion value), ignores continuation
        references, and binds as the entry found.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        passwordFile = os.path.join(directory, "pass")
        with open(passwordFile, "w") as f:
            f.write("service\n")
        checker = self.checker(
            "base=dc=example,dc=org&filter=(sAMAccountName=%s)"
            f"&bind_dn=cn=relay&bind_password_file={passwordFile}"
        )
        d = checker.requestAvatarId(credentials("*)(uid=*", "secret"))
        server = MemoryServer(self.reactor)
        [bind] = server.received()
        self.assertEqual((bind.value.dn, bind.value.auth), (b"cn=relay", b"service"))
        server.send(answer(pureldap.LDAPBindResponse(resultCode=0), bind.id))
        [search] = server.received()
        request = search.value
        self.assertIsInstance(request, pureldap.LDAPSearchRequest)
        self.assertEqual(request.baseObject, b"dc=example,dc=org")
        self.assertEqual((request.scope, request.derefAliases), (2, 0))
        self.assertEqual((request.sizeLimit, request.attributes), (2, [b"1.1"]))
        self.assertEqual(request.filter.assertionValue.value, b"*)(uid=*")
        server.send(
            answer(
                pureldap.LDAPSearchResultEntry(
                    objectName="cn=Odd,dc=example,dc=org", attributes=[]
                ),
                search.id,
            )
            + answer(
                pureldap.LDAPSearchResultReference(
                    uris=[pureldap.LDAPString("ldap://other/dc=example,dc=org")]
                ),
                search.id,
            )
            + answer(pureldap.LDAPSearchResultDone(resultCode=0), search.id)
        )
        [userBind] = server.received()
        self.assertEqual(
            (userBind.value.dn, userBind.value.auth),
            (b"cn=Odd,dc=example,dc=org", b"secret"),
        )
        server.send(answer(pureldap.LDAPBindResponse(resultCode=49), userBind.id))
        server.close()
        failure = self.failureResultOf(d, UnauthorizedLogin)
        self.assertNotIsInstance(failure.value, UnknownUser)

    def test_otherBindResults(self) -> None:
        """
        A bind answered with anything but success or invalidCredentials
        (here unwillingToPerform) makes the checker unavailable, logged.
        """
        checker = self.checker("dn=uid=%s,o=x")
        d = checker.requestAvatarId(credentials("alice", "s3cret-pw"))
        server = MemoryServer(self.reactor)
        [bind] = server.received()
        with capturedLogs() as events:
            server.send(
                answer(
                    pureldap.LDAPBindResponse(resultCode=53, errorMessage="no way"),
                    bind.id,
                )
            )
            server.close()
            self.failureResultOf(d, CheckerUnavailable)
        text = logText(events)
        self.assertIn("result 53 no way", text)
        self.assertNotIn("s3cret-pw", text)

    def test_noticeOfDisconnection(self) -> None:
        """
        An unsolicited message (the server's notice of disconnection) ends
        the connection and makes the checker unavailable.
        """
        checker = self.checker("dn=uid=%s,o=x")
        d = checker.requestAvatarId(credentials("alice", "pw"))
        server = MemoryServer(self.reactor)
        server.received()
        server.send(
            answer(
                pureldap.LDAPExtendedResponse(
                    resultCode=52, responseName=b"1.3.6.1.4.1.1466.20036"
                ),
                0,
            )
        )
        self.assertTrue(server.transport.disconnecting)
        server.close()
        self.failureResultOf(d, CheckerUnavailable)

    def test_garbage(self) -> None:
        """
        Bytes that are not an LDAP message end the connection and make the
        checker unavailable.
        """
        checker = self.checker("dn=uid=%s,o=x")
        d = checker.requestAvatarId(credentials("alice", "pw"))
        server = MemoryServer(self.reactor)
        server.send(b"\x30\x03\x02\x01\x01")
        server.close()
        self.failureResultOf(d, CheckerUnavailable)

    def test_timeout(self) -> None:
        """
        A server that does not answer within C{timeout} seconds makes the
        checker unavailable, and the connection is aborted.
        """
        checker = self.checker("dn=uid=%s,o=x&timeout=5")
        d = checker.requestAvatarId(credentials("alice", "pw"))
        server = MemoryServer(self.reactor)
        server.transport.abortConnection = lambda: server.close()  # type: ignore[method-assign]
        with capturedLogs() as events:
            self.reactor.advance(5)
            failure = self.failureResultOf(d, CheckerUnavailable)
        self.assertIn("no answer within 5.0s", str(failure.value))
        self.assertIn("no answer within 5.0s", logText(events))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_connectTimeout(self) -> None:
        """
        A connection that is never made also times out as unavailable.
        """
        checker = self.checker("dn=uid=%s,o=x&timeout=2")
        d = checker.requestAvatarId(credentials("alice", "pw"))
        self.reactor.advance(2)
        self.failureResultOf(d, CheckerUnavailable)

    def test_tooMany(self) -> None:
        """
        Beyond C{maxPending} logins under way, a login is unavailable at
        once, without connecting.
        """
        checker = self.checker("dn=uid=%s,o=x")
        checker.maxPending = 2
        pending = [checker.requestAvatarId(credentials("a", "pw")) for _ in range(2)]
        self.failureResultOf(
            checker.requestAvatarId(credentials("a", "pw")), CheckerUnavailable
        )
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.reactor.advance(10)
        for d in pending:
            self.failureResultOf(d, CheckerUnavailable)
        checker.requestAvatarId(credentials("a", "pw"))
        self.assertEqual(len(self.reactor.tcpClients), 3)

    def test_close(self) -> None:
        """
        C{close} aborts the connections of logins under way, which fail as
        unavailable, and fires when they are closed.
        """
        checker = self.checker("dn=uid=%s,o=x")
        d = checker.requestAvatarId(credentials("alice", "pw"))
        server = MemoryServer(self.reactor)
        server.transport.abortConnection = lambda: server.close()  # type: ignore[method-assign]
        closed = checker.close()
        self.successResultOf(closed)
        self.failureResultOf(d, CheckerUnavailable)


class LDAPConnectionTests(SynchronousTestCase):
    """
    Tests for L{LDAPConnection}.
    """

    def test_lostFailsAll(self) -> None:
        """
        Losing the connection fails every request under way and any later
        one.
        """
        connection = LDAPConnection()
        connection.makeConnection(StringTransport())
        d = connection.request(pureldap.LDAPBindRequest(dn=b"x", auth=b"y"))
        from twisted.internet.error import ConnectionLost

        connection.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(d, ConnectionLost)
        self.failureResultOf(
            connection.request(pureldap.LDAPBindRequest(dn=b"x", auth=b"y")),
            ConnectionLost,
        )
        self.failureResultOf(connection.whenHandshaken(), ConnectionLost)
        self.successResultOf(connection.whenClosed())


class UntrustedServerTests(TestCase):
    """
    Tests against an in-process TLS server whose certificate the checker
    does not trust.
    """

    async def test_passwordNotSent(self) -> None:
        """
        When the server's certificate fails verification, the checker is
        unavailable and the server received no application data at all:
        the bind (with the password) is written only after the handshake.
        """
        from twisted.internet import reactor, ssl
        from twisted.internet.protocol import Factory, Protocol

        from tests.upstream_support import CertificateAuthority

        directory = self.mktemp()
        os.mkdir(directory)
        trusted = CertificateAuthority(directory, name="trusted CA")
        untrusted = CertificateAuthority(directory, name="untrusted CA")
        certificatePath, keyPath = untrusted.issue([HOST], "server")
        with open(certificatePath) as f:
            pem = f.read()
        with open(keyPath) as f:
            pem += f.read()
        received: list[bytes] = []

        class Recorder(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        port = reactor.listenSSL(  # type: ignore[attr-defined]
            0,
            Factory.forProtocol(Recorder),
            ssl.PrivateCertificate.loadPEM(pem).options(),
            interface=HOST,
        )
        self.addCleanup(port.stopListening)
        checker = LDAPChecker(
            parseArgument(
                f"ldaps://{HOST}:{port.getHost().port}/?dn=uid=%s,o=x"
                f"&ca_file={trusted.certificatePath}"
            )
        )
        self.addCleanup(checker.close)
        with capturedLogs() as events:
            with self.assertRaises(CheckerUnavailable):
                await checker.requestAvatarId(credentials("alice", "wonderland"))
        self.assertIn("certificate verify failed", logText(events))
        self.assertEqual(received, [])


# -- against slapd ------------------------------------------------------------


class SlapdMixin:
    """
    For test cases using the shared slapd (L{sharedSlapd}).
    """

    slapd: Slapd

    def setUp(self) -> None:
        reason = slapdMissing()
        if reason is not None:
            raise SkipTest(reason)
        self.slapd = sharedSlapd()
        directory = self.mktemp()  # type: ignore[attr-defined]
        os.mkdir(directory)
        self.directory = directory
        self.passwordFile = os.path.join(directory, "ldap.pass")
        with open(self.passwordFile, "w") as f:
            f.write(SERVICE_PASSWORD + "\n")

    def dnArgument(self, tls: str = "ldaps", host: str = HOST, **options: str) -> str:
        """
        The argument for a DN-template checker on the slapd.
        """
        return self._argument(tls, host, {"dn": DN_TEMPLATE, **options})

    def searchArgument(
        self, tls: str = "ldaps", filter: str = AD_FILTER, **options: str
    ) -> str:
        """
        The argument for a search-then-bind checker on the slapd's
        Active-Directory-style users, with the service account.
        """
        return self._argument(
            tls,
            HOST,
            {
                "base": SUFFIX,
                "filter": filter,
                "bind_dn": SERVICE_DN,
                "bind_password_file": self.passwordFile,
                **options,
            },
        )

    def _argument(self, tls: str, host: str, options: dict[str, str]) -> str:
        if tls == "starttls":
            options = {"starttls": "yes", **options}
        elif tls == "none":
            options = {"insecure": "yes", **options}
        if tls != "none" and "ca_file" not in options:
            options["ca_file"] = self.slapd.caPath
        query = "&".join(f"{k}={v}" for k, v in options.items() if v)
        return f"{self.slapd.url(tls, host)}?{query}"

    def makeChecker(self, argument: str) -> LDAPChecker:
        checker = LDAPChecker(parseArgument(argument))
        self.addCleanup(checker.close)  # type: ignore[attr-defined]
        return checker

    async def login(self, argument: str, username: str, password: str) -> Any:
        """
        The avatar id, or the exception class, for one login.
        """
        checker = self.makeChecker(argument)
        try:
            return await checker.requestAvatarId(credentials(username, password))
        except Exception as e:
            return type(e)


class DNTemplateTests(SlapdMixin, TestCase):
    """
    Logins with a DN template against slapd.
    """

    async def test_good(self) -> None:
        """
        The right password logs in, as the name given, over ldaps://,
        StartTLS, and plain ldap:// to loopback with insecure=yes.
        """
        for tls in ("ldaps", "starttls", "none"):
            result = await self.login(self.dnArgument(tls), "alice", "wonderland")
            self.assertEqual(result, "alice", tls)

    async def test_wrongPassword(self) -> None:
        """
        A wrong password, and an unknown user (both invalidCredentials to
        the server), are a wrong password: final, not L{UnknownUser}.
        """
        self.assertIs(
            await self.login(self.dnArgument(), "alice", "builder"), UnauthorizedLogin
        )
        self.assertIs(
            await self.login(self.dnArgument(), "nobody", "builder"), UnauthorizedLogin
        )

    async def test_emptyPassword(self) -> None:
        """
        This slapd, like Active Directory, accepts a bind with a DN and an
        empty password (an unauthenticated bind); the checker refuses the
        empty password.
        """
        checker = self.makeChecker(self.dnArgument())
        connection = await checker._connect(checker._getReactor())
        try:
            code, message = await _rawBind(
                connection, f"uid=alice,{PEOPLE}".encode(), b""
            )
        finally:
            await checker._disconnect(checker._getReactor(), connection)
        self.assertEqual(code, 0, message)
        self.assertIs(
            await self.login(self.dnArgument(), "alice", ""), UnauthorizedLogin
        )

    async def test_dnInjection(self) -> None:
        """
        C{alice,ou=admins} names no entry (its comma is escaped): neither
        the password of C{uid=alice,ou=admins,...} nor alice's logs in.
        """
        for password in (ADMIN_ALICE_PASSWORD, "wonderland"):
            self.assertIs(
                await self.login(self.dnArgument(), "alice,ou=admins", password),
                UnauthorizedLogin,
            )
        for name in ("alice+cn=Alice", "*", "#alice", "alice\\"):
            self.assertIs(
                await self.login(self.dnArgument(), name, "wonderland"),
                UnauthorizedLogin,
                name,
            )
        # The directory ignores these spaces: refused before asking it.
        for name in ("alice ", " alice", "alice\n"):
            self.assertIs(
                await self.login(self.dnArgument(), name, "wonderland"),
                UnknownUser,
                name,
            )

    async def test_untrustedCA(self) -> None:
        """
        A certificate not issued by a trusted CA (another CA's file, or the
        system's CAs) makes the checker unavailable, over ldaps:// and over
        StartTLS; the log says why.
        """
        from tests.upstream_support import CertificateAuthority

        other = CertificateAuthority(self.directory, name="another CA").certificatePath
        with capturedLogs() as events:
            for tls in ("ldaps", "starttls"):
                self.assertIs(
                    await self.login(
                        self.dnArgument(tls, ca_file=other), "alice", "wonderland"
                    ),
                    CheckerUnavailable,
                )
        self.assertIn("certificate verify failed", logText(events))
        systemCAs = self.dnArgument().replace(f"&ca_file={self.slapd.caPath}", "")
        self.assertNotIn("ca_file", systemCAs)
        self.assertIs(
            await self.login(systemCAs, "alice", "wonderland"), CheckerUnavailable
        )

    async def test_wrongName(self) -> None:
        """
        A trusted certificate for another name (slapd's names localhost
        and 127.0.0.1, not 127.0.0.2) makes the checker unavailable.
        """
        with capturedLogs() as events:
            self.assertIs(
                await self.login(
                    self.dnArgument(host=OTHER_HOST), "alice", "wonderland"
                ),
                CheckerUnavailable,
            )
        self.assertIn(OTHER_HOST, logText(events))

    async def test_deadServer(self) -> None:
        """
        A refused connection makes the checker unavailable, logged without
        the password.
        """
        [port] = freePorts(1)
        with capturedLogs() as events:
            self.assertIs(
                await self.login(
                    f"ldaps://{HOST}:{port}/?dn=uid=%s,o=x", "alice", "wonderland"
                ),
                CheckerUnavailable,
            )
        text = logText(events)
        self.assertIn("ConnectionRefusedError", text)
        self.assertNotIn("wonderland", text)


async def _rawBind(
    connection: LDAPConnection, dn: bytes, password: bytes
) -> tuple[int, str]:
    result, _ = await connection.request(pureldap.LDAPBindRequest(dn=dn, auth=password))
    return result.resultCode, str(result.errorMessage)


class SearchTests(SlapdMixin, TestCase):
    """
    Search-then-bind logins against slapd.
    """

    async def test_good(self) -> None:
        """
        The right password logs in, with the filter on C{sAMAccountName} or
        on C{userPrincipalName}, over ldaps:// and StartTLS.
        """
        for tls in ("ldaps", "starttls"):
            self.assertEqual(
                await self.login(self.searchArgument(tls), "carol", "carol-secret"),
                "carol",
            )
        self.assertEqual(
            await self.login(
                self.searchArgument(filter="(userPrincipalName=%s)"),
                "dave@example.org",
                "dave-secret",
            ),
            "dave@example.org",
        )

    async def test_wrongPassword(self) -> None:
        """
        A wrong password for an entry found is a wrong password (final).
        """
        self.assertIs(
            await self.login(self.searchArgument(), "carol", "dave-secret"),
            UnauthorizedLogin,
        )

    async def test_unknown(self) -> None:
        """
        A name no entry matches is an L{UnknownUser}.
        """
        self.assertIs(
            await self.login(self.searchArgument(), "zelda", "x"), UnknownUser
        )

    async def test_ambiguous(self) -> None:
        """
        A name that two entries match is refused (unavailable), logged
        with both DNs, even with the right password.
        """
        with capturedLogs() as events:
            self.assertIs(
                await self.login(self.searchArgument(), "twin", TWIN_PASSWORD),
                CheckerUnavailable,
            )
        text = logText(events)
        self.assertIn("more than one entry", text)
        self.assertIn("Twin\\x20One", text)
        self.assertNotIn(TWIN_PASSWORD, text)

    async def test_filterInjection(self) -> None:
        """
        Filter syntax in a name is literal: C{*)(uid=*}, C{alice)(|(uid=*},
        C{*} and C{car*} match nobody, with any user's password.
        """
        for name in ("*)(uid=*", "carol)(|(sAMAccountName=*", "*", "car*", "carol)"):
            self.assertIs(
                await self.login(self.searchArgument(), name, "carol-secret"),
                UnknownUser,
                name,
            )
        openldap = self.searchArgument(filter="(uid=%s)")
        for name in ("*)(uid=*", "alice)(|(uid=*", "*"):
            self.assertIs(await self.login(openldap, name, "wonderland"), UnknownUser)

    async def test_caseInsensitive(self) -> None:
        """
        The directory's matching rules apply: C{CAROL} finds carol, and the
        avatar is the name as given.
        """
        self.assertEqual(
            await self.login(self.searchArgument(), "CAROL", "carol-secret"), "CAROL"
        )

    async def test_wrongServicePassword(self) -> None:
        """
        A service account the server refuses makes the checker unavailable
        (it is the relay's configuration that is wrong, not the user).
        """
        with open(self.passwordFile, "w") as f:
            f.write("not the service password\n")
        with capturedLogs() as events:
            self.assertIs(
                await self.login(self.searchArgument(), "carol", "carol-secret"),
                CheckerUnavailable,
            )
        text = logText(events)
        self.assertIn(f"bind as {SERVICE_DN} failed: result 49", text)
        self.assertNotIn("carol-secret", text)

    async def test_anonymousSearch(self) -> None:
        """
        Without a service account the search is anonymous: where the
        directory lets anonymous clients search (here C{ou=people}, one
        level: C{uid=alice,ou=admins} is further down) users log in; where
        it does not (insufficientAccessRights), the checker is unavailable,
        logged.
        """
        argument = self.searchArgument(
            filter="(uid=%s)",
            base=PEOPLE,
            scope="one",
            bind_dn="",
            bind_password_file="",
        )
        self.assertNotIn("bind_dn", argument)
        self.assertEqual(await self.login(argument, "alice", "wonderland"), "alice")
        self.assertIs(await self.login(argument, "alice", "x"), UnauthorizedLogin)
        self.assertIs(await self.login(argument, "zelda", "x"), UnknownUser)
        argument = self.searchArgument(bind_dn="", bind_password_file="")
        with capturedLogs() as events:
            self.assertIs(
                await self.login(argument, "carol", "carol-secret"), CheckerUnavailable
            )
        self.assertIn("search failed: result 50", logText(events))

    async def test_scopeOne(self) -> None:
        """
        With C{scope=one} only the base's children are searched.
        """
        argument = self.searchArgument(base=AD_USERS, scope="one")
        self.assertEqual(await self.login(argument, "carol", "carol-secret"), "carol")
        argument = self.searchArgument(base=SUFFIX, scope="one")
        self.assertIs(await self.login(argument, "carol", "carol-secret"), UnknownUser)


# -- the operator kit's contract ----------------------------------------------


class SearchContractTests(SlapdMixin, CheckerContractMixin, TestCase):
    """
    The checker contract for search-then-bind (Active-Directory-style, over
    StartTLS), including a real relay session in memory.
    """

    authType = "ldap"
    validUser = ("carol", "carol-secret")

    def checkerArgument(self) -> str:
        return self.searchArgument("starttls")

    def unavailableArgument(self) -> str:
        [port] = freePorts(1)
        return f"ldaps://{HOST}:{port}/?base={SUFFIX}&filter=(uid=%s)"


class DNTemplateContractTests(SlapdMixin, CheckerContractMixin, TestCase):
    """
    The checker contract for a DN template (over ldaps://): an unknown user
    is a plain refusal, as the server cannot tell it from a wrong password.
    """

    authType = "ldap"
    validUser = ("alice", "wonderland")
    distinguishesUnknownUsers = False

    def checkerArgument(self) -> str:
        return self.dnArgument()

    def unavailableArgument(self) -> str:
        [port] = freePorts(1)
        return f"ldaps://{HOST}:{port}/?dn={DN_TEMPLATE}"
