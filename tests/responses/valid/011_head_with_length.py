"""The response to HEAD: Content-Length describes the GET body, none follows."""

for_head = True
responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "no_body": True, "content_length": 4500,
     "headers": [(b"Content-Type", b"text/html"), (b"Content-Length", b"4500")]},
]
