"""A control character in a value."""

status = 502
