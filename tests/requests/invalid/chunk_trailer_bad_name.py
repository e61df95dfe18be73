"""An invalid trailer field name."""

status = 400
