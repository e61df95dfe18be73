"""A blank after a chunk size, then a bare LF: llhttp's leniency for blanks
takes no bare LF after them."""

status = 400
