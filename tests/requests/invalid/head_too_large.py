"""A head over max_request_line + max_header_bytes: 431 whole or in pieces (a head
that came in one read used to pass)."""

from balancer.http11 import Limits

limits = Limits(max_request_line=256, max_header_bytes=1024)
status = 431
