"""HTTP/2.0 in an HTTP/1 request line."""

status = 505
