"""A bare CR used as a line ending."""

status = 400
