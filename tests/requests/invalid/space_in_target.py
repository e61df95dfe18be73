"""A space inside the target."""

status = 400
