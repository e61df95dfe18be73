"""DEL in a value."""

status = 400
