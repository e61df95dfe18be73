"""NUL in a value."""

status = 400
