"""101 header fields, one over the default max_headers."""

status = 431
