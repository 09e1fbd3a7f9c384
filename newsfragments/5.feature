Brute-force lockout (``[auth.lockout]``): failed logins counted per address, per
user within a subnet and per subnet; locked logins get ``454 4.7.0`` even with the
right password; repeat locks double; recently successful addresses stay exempt;
failed logins are answered after a growing delay; a fail2ban filter and jail ship
in ``etc/fail2ban/``; ``smtpauth-relay lockout list|clear`` shows and ends locks.
``[relay] sender_login_map`` limits the MAIL FROM addresses each user may use
(553 5.7.1 otherwise), optionally the From: header too (``check_header_from``).
Messages with more than 50 Received headers are refused as mail loops.
``[limits]``: messages and recipients per user per hour (451 4.7.1), connections
per address per minute and messages per session (421 4.7.0). ``[server]
data_timeout`` and ``max_session_time`` end slow or endless sessions.
``smtpauth-relay passwd`` refuses weak passwords (length, user name or domain in
it, zxcvbn's estimate) unless ``--force``; ``smtpauth-relay audit FILE`` finds
accounts whose password is among the most common ones. ``[auth]
allowed_networks`` restricts where each user may log in from.
