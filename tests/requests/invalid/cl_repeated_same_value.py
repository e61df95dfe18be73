"""Content-Length twice, even with the same value."""

status = 400
