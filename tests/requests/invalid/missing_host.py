"""HTTP/1.1 without Host."""

status = 400
