"""A non-numeric Content-Length."""

status = 400
