"""A control character in the target."""

status = 400
