"""An IP literal that holds no IPv6 address (RFC 3986 §3.2.2; nginx and HAProxy
forward it)."""

status = 400
