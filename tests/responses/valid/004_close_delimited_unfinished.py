"""A close-delimited body is not complete until the backend closes."""

complete = False
responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "keep_alive": False,
     "body": b"still coming", "complete": False, "headers": []},
]
