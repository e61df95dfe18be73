"""The HTTP/2 connection preface."""

status = 400
