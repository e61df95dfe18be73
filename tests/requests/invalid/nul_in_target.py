"""NUL in the target."""

status = 400
