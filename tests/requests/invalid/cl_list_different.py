"""Content-Length as a list of different numbers."""

status = 400
