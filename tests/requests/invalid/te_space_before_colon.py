"""Whitespace between the field name and the colon (RFC 9112 5.1)."""

status = 400
