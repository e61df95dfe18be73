"""A valid request, then a CL.TE request on the same connection."""

status = 400
