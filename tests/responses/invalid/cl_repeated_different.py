"""Content-Length twice with different values."""

status = 502
