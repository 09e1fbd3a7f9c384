"""
twistd plugin: C{twistd -n smtpauth-relay --config /etc/smtpauth-relay/relay.toml}.
"""

from twisted.application.service import ServiceMaker

smtpauthRelay = ServiceMaker(
    "smtpauth-relay",
    "smtpauth_relay.tap",
    "Authenticating SMTP submission relay (587/465, SMTP AUTH over TLS).",
    "smtpauth-relay",
)
