"""An Upgrade request with a chunked body."""

status = 400
