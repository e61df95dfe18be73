"""The protocol name is case-sensitive."""

status = 400
