"""Host as an IPv6 literal with port, an IPv4 address with port, and an IDNA name."""

requests = [
    {"method": b"GET", "target": b"/", "host": b"[::1]:8080",
     "headers": [(b"Host", b"[::1]:8080")]},
    {"method": b"GET", "target": b"/", "host": b"127.0.0.1:80",
     "headers": [(b"Host", b"127.0.0.1:80")]},
    {"method": b"GET", "target": b"/", "host": b"xn--caf-dma.example",
     "headers": [(b"Host", b"xn--caf-dma.example")]},
]
