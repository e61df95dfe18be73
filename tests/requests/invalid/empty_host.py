"""An empty Host."""

status = 400
