"""HTTP/0.9 spelled out."""

status = 505
