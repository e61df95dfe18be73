"""Whitespace before the first field line (RFC 9112 2.2)."""

status = 400
