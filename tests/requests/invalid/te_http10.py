"""Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)."""

status = 400
