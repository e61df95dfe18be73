"""A hexadecimal Content-Length."""

status = 400
