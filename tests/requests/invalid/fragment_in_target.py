"""A fragment in the target (RFC 9112 3.2: origin-form has none; a front proxy
and a cache behind it could read the path apart; HAProxy 2.8.2+ refuses it too)."""

status = 400
