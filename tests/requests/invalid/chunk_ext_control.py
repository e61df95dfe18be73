"""A control character in a chunk extension."""

status = 400
