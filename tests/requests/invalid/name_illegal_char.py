"""A delimiter inside a field name."""

status = 400
