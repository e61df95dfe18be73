"""A sub-delim in an absolute-form target's host (a reg-name RFC 3986 allows,
nginx refuses in a request line, HAProxy forwards: the stricter wins)."""

status = 400
