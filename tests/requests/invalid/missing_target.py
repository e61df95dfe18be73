"""No target in the request line."""

status = 400
