# -*- test-case-name: tests.test_passwordpolicy -*-
"""
What makes a password too weak to be a key to the relay.

L{checkPassword} applies the policy of C{smtpauth-relay passwd}: a minimum
length, no user name or domain name in the password, and a strength estimate
from zxcvbn (U{https://github.com/dwolfhub/zxcvbn-python}), whose bundled
frequency lists also give L{commonPasswords} to C{smtpauth-relay audit}.

zxcvbn is imported on first use only: it builds its dictionaries on import.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

__all__ = [
    "MIN_LENGTH",
    "MIN_SCORE",
    "checkPassword",
    "commonPasswords",
    "domainLabels",
]

MIN_LENGTH = 12
"""
The fewest characters a password may have.
"""

MIN_SCORE = 3
"""
The lowest zxcvbn score (0 to 4) a password may have: 3 means "safely
unguessable: moderate protection from offline slow-hash scenario".
"""

_ESTIMATE_LENGTH = 100
"""
Only this many characters of a password go to zxcvbn, whose matching slows
down with length and which refuses long passwords outright; a password this
long is not weak for want of the rest.
"""

_MIN_FRAGMENT = 3
"""
A user name or domain label shorter than this is not looked for in the
password (every other password would contain a one-letter user name).
"""

_GENERIC_LABELS = frozenset(
    ["ac", "co", "com", "edu", "gov", "mail", "net", "org", "smtp", "www"]
)
"""
Domain labels that say nothing about the organisation (C{co} of C{co.uk},
C{www}, C{mail}): not refused in passwords.
"""

_zxcvbnLock = threading.Lock()
"""
zxcvbn keeps the user inputs of the current estimate in a module global, so
two estimates must not run at once.
"""


def domainLabels(domain: str) -> list[str]:
    """
    The labels of a domain that name its owner, as they might appear in a
    password: C{["example"]} for C{example.org}, C{["relay", "example"]} for
    C{relay.mail.example.co.uk}.

    The top-level label, generic labels (L{_GENERIC_LABELS}) and labels
    shorter than three characters are left out; an IDNA (C{xn--}) label is
    given in Unicode too.

    @param domain: A domain name, such as the part of an address after C{@}.

    @return: Lower-case labels, without repeats, in the order of the domain.
    """
    labels = [label for label in domain.strip(".").lower().split(".") if label]
    if len(labels) > 1:
        labels = labels[:-1]
    found: list[str] = []
    for label in labels:
        forms = [label]
        if label.startswith("xn--"):
            try:
                forms.append(label.encode("ascii").decode("idna"))
            except UnicodeError:
                pass
        for form in forms:
            if (
                len(form) >= _MIN_FRAGMENT
                and form not in _GENERIC_LABELS
                and form not in found
            ):
                found.append(form)
    return found


def _userFragments(username: str) -> list[str]:
    """
    The parts of a user name to look for in a password: the whole name and,
    for an address, its local part.
    """
    fragments = [username.casefold()]
    local, at, _ = username.rpartition("@")
    if at and local:
        fragments.append(local.casefold())
    return [f for f in fragments if len(f) >= _MIN_FRAGMENT]


def checkPassword(
    password: str, username: str, domains: Sequence[str] = ()
) -> list[str]:
    """
    Tell why a password is too weak, if it is.

    A password is too weak if:

      - it has fewer than L{MIN_LENGTH} characters;
      - it contains the user name (or, for an address, its local part),
        forwards or backwards, in any case;
      - it contains a label of one of C{domains} (see L{domainLabels}),
        forwards or backwards, in any case;
      - zxcvbn scores it below L{MIN_SCORE}, knowing the user name and the
        domains (only its first 100 characters are scored).

    The reasons never quote the password.

    @param password: The password.
    @param username: The user it is for.
    @param domains: Domains the user belongs to, e.g. that of their address.

    @return: One sentence per reason, without a final full stop; an empty
        list if the password is good enough.
    """
    reasons: list[str] = []
    if len(password) < MIN_LENGTH:
        reasons.append(f"it is shorter than {MIN_LENGTH} characters")

    folded = password.casefold()
    for fragment in _userFragments(username):
        if fragment in folded:
            reasons.append("it contains the user name")
            break
        if fragment[::-1] in folded:
            reasons.append("it contains the user name backwards")
            break

    labels: list[str] = []
    for domain in domains:
        for label in domainLabels(domain):
            if label in labels:
                continue
            labels.append(label)
            if label in folded or label[::-1] in folded:
                reasons.append(f'it contains "{label}", from the domain {domain}')

    score, feedback = _estimate(
        password[:_ESTIMATE_LENGTH], [username, *_userFragments(username), *labels]
    )
    if score < MIN_SCORE:
        reason = f"it is too easy to guess (strength {score} of 4, {MIN_SCORE} needed)"
        if feedback:
            reason += ": " + " ".join(feedback)
        reasons.append(reason)
    return reasons


def _estimate(password: str, userInputs: list[str]) -> tuple[int, list[str]]:
    """
    Ask zxcvbn how strong a password is.

    @param password: At most L{_ESTIMATE_LENGTH} characters.
    @param userInputs: Words the user's attackers know.

    @return: The score, 0 to 4, and zxcvbn's warning and suggestions, each a
        sentence ending with a full stop.
    """
    if not password:
        # zxcvbn fails on the empty string.
        return 0, []
    from zxcvbn import zxcvbn

    with _zxcvbnLock:
        result = zxcvbn(password, user_inputs=userInputs, max_length=_ESTIMATE_LENGTH)
    feedback = result.get("feedback") or {}
    sentences = [feedback.get("warning") or ""]
    sentences.extend(feedback.get("suggestions") or [])
    return int(result["score"]), [str(s) for s in sentences if s]


def commonPasswords(count: int) -> list[str]:
    """
    The most common passwords, most common first, from zxcvbn's frequency
    list (30,000 passwords gathered from leaks; all lower case).

    @param count: How many to return; fewer if the list is shorter.

    @return: The passwords.
    """
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return list(FREQUENCY_LISTS["passwords"][:count])
