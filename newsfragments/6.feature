Runs as a well-behaved systemd daemon: ``Type=notify`` units (READY, RELOADING,
STOPPING, watchdog pings), socket activation through ``systemd:`` listeners, and
``systemctl reload`` (SIGHUP) re-reads the configuration, TLS certificate and
checkers without a restart, keeping the running configuration if the new one is
invalid.
