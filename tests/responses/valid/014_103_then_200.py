"""Several interim responses, with fields, then the final one."""

responses = [
    {"status": 103, "status_line": b"HTTP/1.1 103 Early Hints", "no_body": True,
     "headers": [(b"Link", b"</style.css>; rel=preload")]},
    {"status": 100, "status_line": b"HTTP/1.1 100 Continue", "no_body": True, "headers": []},
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "content_length": 2, "body": b"ok",
     "headers": [(b"Content-Length", b"2")]},
]
