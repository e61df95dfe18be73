"""A four-digit status."""

status = 502
