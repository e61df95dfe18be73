"""An endless series of small trailer fields."""

from balancer.http11 import Limits

limits = Limits(max_request_line=256, max_header_bytes=1024)
status = 400
