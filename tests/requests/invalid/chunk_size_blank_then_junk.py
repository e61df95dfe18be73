"""Blanks after a chunk size and then no extension (";"): junk."""

status = 400
