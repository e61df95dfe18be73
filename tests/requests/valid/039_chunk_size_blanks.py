"""Blanks after a chunk size: RFC 9112's BWS before a chunk extension's ";", and
alone (nginx and HAProxy read both; bug: a 400). Forwarded as the size alone."""

requests = [
    {"method": b"POST", "target": b"/", "host": b"example.com", "chunked": True,
     "body": b"abcdef",
     "headers": [(b"Host", b"example.com"), (b"Transfer-Encoding", b"chunked")]},
]
