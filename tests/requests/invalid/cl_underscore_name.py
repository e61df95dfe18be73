"""Content_Length (any case) beside a chunked body: a CGI-style backend reads it as
Content-Length."""

status = 400
