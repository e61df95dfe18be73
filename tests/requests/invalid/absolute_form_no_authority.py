"""An absolute-form target without a host."""

status = 400
