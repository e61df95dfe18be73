"""A transfer coding before chunked (the proxy only removes chunked)."""

status = 502
