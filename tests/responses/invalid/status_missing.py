"""No status code."""

status = 502
