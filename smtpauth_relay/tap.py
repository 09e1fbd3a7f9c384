"""
The C{twistd smtpauth-relay} command line: options and C{makeService},
nothing else (L{smtpauth_relay.service} builds the relay).
"""

from __future__ import annotations

from typing import Any

from twisted.cred import credentials, strcred
from twisted.python import usage

from smtpauth_relay.config import Config, loadConfig
from smtpauth_relay.errors import ConfigError, ListenerUnavailable, SpoolLocked
from smtpauth_relay.logformat import LogObserverRoot, observerFor


class Options(usage.Options, strcred.AuthOptionMixin):
    """
    C{twistd smtpauth-relay --config PATH [--auth STRCRED ...]}
    """

    synopsis = "[--config PATH] [--auth CHECKER ...]"
    longdesc = (
        "Runs the smtpauth-relay submission gateway described by the TOML "
        "file given with --config.  Each --auth adds a credential checker "
        "(Twisted strcred syntax, e.g. htpasswd:/etc/smtpauth-relay/users) "
        "after the ones in [auth] checkers."
    )
    supportedInterfaces = [credentials.IUsernamePassword]
    optParameters = [
        ["config", "c", None, "Path of the TOML configuration file (required)."],
    ]

    def opt_auth(self, description: str) -> None:
        """
        Add a credential checker (Twisted strcred syntax); may be repeated.
        """
        super().opt_auth(description)
        # Worker processes ([server] workers) make their own from the text.
        self.setdefault("authArguments", []).extend(["--auth", description])

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config PATH is required")
        try:
            self["relayConfig"] = loadConfig(self["config"])
        except ConfigError as e:
            raise usage.UsageError(
                "invalid configuration:\n" + "\n".join(e.problems)
            ) from None


def makeService(options: Options) -> Any:
    """
    Build the relay from parsed C{options}, on the global reactor.
    """
    from twisted.internet import reactor

    from smtpauth_relay.service import holdHangups, makeRelayService

    # Before the listeners: a SIGHUP from then on is a reload, not an end.
    holdHangups()
    config: Config = options["relayConfig"]
    try:
        relay = makeRelayService(
            config,
            reactor,
            options.get("credCheckers", []),
            options.get("authArguments", []),
        )
    except (SpoolLocked, ListenerUnavailable) as e:
        raise SystemExit(f"smtpauth-relay: {e}") from None
    root = LogObserverRoot(
        observerFor(config.logging.format, twistdOptions=options.parent)
    )
    relay.setServiceParent(root)
    return root
