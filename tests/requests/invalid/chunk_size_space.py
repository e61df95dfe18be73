"""Whitespace after a chunk size."""

status = 400
