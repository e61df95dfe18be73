"""A major version the balancer does not implement (llhttp refused it: a 400)."""

status = 505
