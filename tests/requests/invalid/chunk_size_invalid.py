"""A chunk size that is not hex."""

status = 400
