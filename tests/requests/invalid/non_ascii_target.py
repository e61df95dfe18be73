"""Raw non-ASCII bytes in the target."""

status = 400
