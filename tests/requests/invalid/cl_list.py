"""Content-Length as a list."""

status = 400
