Brute-force lockout (``[auth.lockout]``): failed logins counted per address, per
user within a subnet and per subnet; locked logins get ``454 4.7.0`` even with the
right password; repeat locks double; recently successful addresses stay exempt;
failed logins are answered after a growing delay; a fail2ban filter and jail ship
in ``etc/fail2ban/``; ``smtpauth-relay lockout list|clear`` shows and ends locks.
