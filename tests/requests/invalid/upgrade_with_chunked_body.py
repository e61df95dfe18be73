"""An Upgrade request with a chunked body (the upgrade one the balancer asks for)."""

status = 400
