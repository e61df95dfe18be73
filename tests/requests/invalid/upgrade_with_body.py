"""An Upgrade request with a body: llhttp would pass the body on as tunnel data, and
if the upgrade was refused it was parsed as the next request (smuggling)."""

status = 400
