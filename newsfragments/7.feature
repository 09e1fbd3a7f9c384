Smarthost login with OAuth2 (``[delivery] auth = "xoauth2"`` or
``"oauthbearer"`` and ``[delivery.oauth2]``): tokens fetched, cached and
renewed by the relay (client secret, certificate assertion or refresh token),
``smtpauth-relay oauth2 authorize`` (device-code sign-in), and presets for
Microsoft 365 and Google in ``etc/examples/``.
Sender rewriting for single-mailbox upstreams: ``[delivery] rewrite_sender``,
``rewrite_from`` (original author kept in ``Reply-To:`` and
``X-Original-From:``), and per-user ``=> ADDRESS`` in the sender login map.
A legacy lane for old scanners and printers in ``[relay] trusted_networks``:
per-listener ``minimum_tls_version`` (down to TLS 1.0 for those devices
only), ``allow_plaintext_auth_from`` (AUTH without TLS on a LAN-bound
listener) and ``allow_bare_lf_from`` (bare LF taken as a line end); such
mail is tagged in ``Received``.
