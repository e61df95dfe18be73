"""The response to HEAD with chunked: no chunks follow."""

for_head = True
responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "no_body": True, "chunked": True,
     "headers": [(b"Transfer-Encoding", b"chunked")]},
]
