"""A request line that never ends: refused once it passes the limit."""

status = 414
