"""A negative Content-Length."""

status = 502
