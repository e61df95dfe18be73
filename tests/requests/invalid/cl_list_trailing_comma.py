"""Content-Length as a list ending in a comma."""

status = 400
