"""A WebSocket handshake: parsing stops after the head; the frame after it is `leftover`."""

requests = [
    {"method": b"GET", "target": b"/chat", "host": b"example.com", "upgrade": b"websocket",
     "connection_tokens": frozenset({b"upgrade"}),
     "headers": [(b"Host", b"example.com"), (b"Upgrade", b"websocket"),
                 (b"Connection", b"Upgrade"),
                 (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                 (b"Sec-WebSocket-Version", b"13")]},
]
upgraded = True
leftover = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
