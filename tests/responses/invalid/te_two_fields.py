"""Two Transfer-Encoding fields."""

status = 502
