"""A folded field."""

status = 502
