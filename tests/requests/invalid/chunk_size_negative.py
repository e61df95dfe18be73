"""A negative chunk size."""

status = 400
