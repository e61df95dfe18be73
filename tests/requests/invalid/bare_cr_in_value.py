"""A bare CR inside a value."""

status = 400
