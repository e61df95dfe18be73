"""An HTTP/0.9 request line."""

status = 505
