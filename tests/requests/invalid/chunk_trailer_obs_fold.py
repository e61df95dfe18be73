"""A folded trailer field."""

status = 400
