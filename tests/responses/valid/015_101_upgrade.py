"""101: the response completes at its head; the frames after it are `leftover`."""

upgraded = True
leftover = b"\x81\x05hello\x81\x05again"
responses = [
    {"status": 101, "status_line": b"HTTP/1.1 101 Switching Protocols", "no_body": True,
     "connection_tokens": frozenset({b"upgrade"}),
     "headers": [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                 (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")]},
]
