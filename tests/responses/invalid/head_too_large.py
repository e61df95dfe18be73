"""A response head that never ends within the limit."""

from balancer.http11 import Limits

limits = Limits(max_request_line=256, max_header_bytes=1024)
status = 502
