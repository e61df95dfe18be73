"""An empty Host in HTTP/1.0."""

status = 400
