"""Blanks after a chunk size, then a bare CR (the leniency for blanks takes no bare CR)."""

status = 400
