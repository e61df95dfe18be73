"""A tab inside Host."""

status = 400
