"""A request line of 8193 bytes, one over the default max_request_line: 414 whether it
arrives whole or byte by byte."""

status = 414
