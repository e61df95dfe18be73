"""101 without Connection: upgrade."""

status = 502
