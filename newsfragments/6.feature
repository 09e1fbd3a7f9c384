Runs as a well-behaved systemd daemon: ``Type=notify`` units (READY, RELOADING,
STOPPING, watchdog pings), socket activation through ``systemd:`` listeners, and
``systemctl reload`` (SIGHUP) re-reads the configuration, TLS certificate and
checkers without a restart, keeping the running configuration if the new one is
invalid.
PROXY protocol v1 and v2 on a listener (``proxy_protocol = true`` with
``trusted_proxies``): behind HAProxy the relay sees the real client address.
Prometheus metrics (``[metrics] endpoint``): connections, AUTH attempts,
lockouts, messages accepted and rejected by reason, queue depth and age,
delivery attempts and latency; a Grafana dashboard in ``etc/grafana/``.
``[logging] format = "json"`` writes one JSON object per event (time, level,
message and named fields such as user and peer), for journald and Loki.
A ``systemd:`` listener naming a socket systemd did not pass now stops the
start with a message naming the sockets that were passed.
