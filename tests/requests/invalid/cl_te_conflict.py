"""CL.TE: Content-Length and Transfer-Encoding together (the classic smuggle)."""

status = 400
