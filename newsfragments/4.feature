New credential checkers: ``ldap:`` (OpenLDAP or Active Directory, by DN
template or search-then-bind, over verified TLS), ``sql:`` (SQLite or
PostgreSQL, a query of your own returning the hash) and ``imap:`` (log in
with the mailbox password, checked against the office's IMAP server, with an
optional short cache).
SCRAM-SHA-256 (keys stored, never the password) and CRAM-MD5 login
mechanisms; ``smtpauth-relay passwd --scheme scram-sha-256|cram-md5``. EHLO
offers a mechanism only when every checker can serve it for every user.
An operator kit, ``smtpauth_relay.testing.CheckerContractMixin``, and a
worked example plugin in ``etc/examples/checker/`` for writing your own
checker.
Checkers are closed (connections, pools) when a reload replaces them and
when the relay stops.
