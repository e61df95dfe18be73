"""Content-Length twice."""

status = 502
