"""A space in a field name."""

status = 502
