"""An absolute-form target whose host is ``*``, with a port."""

status = 400
