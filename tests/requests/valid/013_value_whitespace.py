"""Whitespace around values: leading OWS is dropped, trailing OWS is kept in `headers`
as received, and never affects Host, Content-Length or Connection; a Content-Length
with trailing OWS is written plainly (it is forwarded so: RFC 9110 §5.5)."""

requests = [
    {"method": b"GET", "target": b"/", "host": b"example.com", "content_length": 0,
     "connection_tokens": frozenset({b"keep-alive"}),
     "headers": [(b"Host", b"example.com \t"), (b"X-Padded", b"value \t"),
                 (b"Content-Length", b"0"), (b"Connection", b"keep-alive ")]},
]
