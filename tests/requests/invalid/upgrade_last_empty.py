"""An Upgrade field that ends empty: no protocol to switch to."""

status = 400
