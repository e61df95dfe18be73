"""A valid request, then binary garbage."""

status = 400
