First release of the gateway: ``twistd -n smtpauth-relay --config FILE`` runs an
ESMTP submission server on any Twisted endpoints (STARTTLS or implicit TLS) with
AUTH PLAIN/LOGIN over TLS against ``htpasswd`` files (bcrypt, argon2id,
sha512-crypt), no open relay, RFC 3848 ``Received`` headers, a durable fsynced
spool and Maildir delivery; ``smtpauth-relay check-config``, ``passwd`` and
``demo`` commands; ``./run demo`` starts a working relay on 127.0.0.1.
