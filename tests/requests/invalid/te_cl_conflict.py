"""TE.CL: the same conflict, Transfer-Encoding first."""

status = 400
