"""Field values may hold quotes, HTAB, obs-text; a value may be empty; names keep their case."""

requests = [
    {"method": b"GET", "target": b"/", "host": b"example.com",
     "headers": [(b"Host", b"example.com"), (b"Cookie", b'a=1; b="two words"'),
                 (b"X-Obs-Text", b"caf\xc3\xa9"), (b"X-Tab", b"a\tb"), (b"X-Empty", b""),
                 (b"x-lower-NAME", b"!#$%&'*+-.^_`|~")]},
]
