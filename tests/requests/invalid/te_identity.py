"""identity is not a transfer coding any more; with chunked not the final
coding the body's length cannot be known (RFC 9112 §6.1: 400)."""

status = 400
