"""A path in Host."""

status = 400
