"""A space inside Host."""

status = 400
