"""A trailer section past the head limit (httptools buffers trailer values whole, so
they used to grow without bound)."""

from balancer.http11 import Limits

limits = Limits(max_request_line=256, max_header_bytes=1024)
status = 400
