"""
smtpauth-relay: an authenticating SMTP submission relay gateway built on Twisted.
"""

__version__ = "0.1.0.dev0"
