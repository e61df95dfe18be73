"""Non-ASCII bytes in a field name."""

status = 400
