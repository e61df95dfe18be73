"""Whitespace between a field name and its colon."""

status = 502
