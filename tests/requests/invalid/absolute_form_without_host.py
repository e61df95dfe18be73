"""An HTTP/1.1 request in absolute form sends Host all the same (RFC 9112 §3.2)."""

status = 400
