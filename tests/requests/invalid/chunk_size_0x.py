"""A chunk size with a 0x prefix."""

status = 400
