"""A Content-Length beyond 64 bits."""

status = 400
