"""A response where a request belongs."""

status = 400
