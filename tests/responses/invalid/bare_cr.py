"""A bare CR in a value."""

status = 502
