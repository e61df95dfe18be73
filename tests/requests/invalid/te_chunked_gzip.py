"""chunked that is not the final coding: the body has no framing."""

status = 400
