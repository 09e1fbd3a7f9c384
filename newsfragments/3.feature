Outbound delivery: ``[delivery] mode = "smarthost"`` (STARTTLS or implicit TLS
with the certificate verified, AUTH, connections reused for bursts, ``AUTH=`` of
the submitter on request) and ``mode = "mx"`` (MX lookup, null MX, IPv6,
opportunistic STARTTLS). Temporary failures are retried on ``[queue]
retry_schedule``; permanent failures and messages older than ``max_lifetime``
are bounced to the sender as RFC 3464 reports, optionally with a delay warning.
``smtpauth-relay queue list|show|flush|delete|bounce`` shows and steers the queue.
