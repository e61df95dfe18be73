"""A signed Content-Length (Python's int() would take it)."""

status = 400
