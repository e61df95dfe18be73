"""Two Transfer-Encoding fields."""

status = 400
