"""Hex chunk sizes in either case, a zero-padded last chunk, then a pipelined request."""

requests = [
    {"method": b"POST", "target": b"/", "host": b"example.com", "chunked": True,
     "body": b"a0123456789abcdefghijklmnopqrstuvwxyz",
     "headers": [(b"Host", b"example.com"), (b"Transfer-Encoding", b"Chunked")]},
    {"method": b"GET", "target": b"/after", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
