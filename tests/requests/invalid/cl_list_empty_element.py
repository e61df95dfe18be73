"""Content-Length as a list with an empty element (HAProxy refuses it too)."""

status = 400
