"""Methods are case-sensitive."""

status = 400
