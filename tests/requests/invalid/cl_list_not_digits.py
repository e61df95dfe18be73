"""Content-Length as a list with an element not digits."""

status = 400
