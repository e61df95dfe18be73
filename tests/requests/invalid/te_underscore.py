"""Transfer_Encoding beside Content-Length: a CGI-style backend (Puma, WSGI, PHP)
reads it as Transfer-Encoding and frames the body otherwise than the balancer."""

status = 400
