"""A Content-Length of 4,401 digits (leading zeros), more than Python reads as a
number: refused as too large (bug: "User callback error")."""

status = 400
