"""An empty chunk size line."""

status = 400
