"""An IP literal without its closing bracket."""

status = 400
