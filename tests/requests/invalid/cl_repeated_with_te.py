"""Content-Length twice with the same value beside Transfer-Encoding: still
refused once merged."""

status = 400
