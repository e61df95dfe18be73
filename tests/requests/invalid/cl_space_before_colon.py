"""Whitespace between Content-Length and the colon."""

status = 400
