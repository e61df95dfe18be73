"""Whitespace after the version."""

status = 400
