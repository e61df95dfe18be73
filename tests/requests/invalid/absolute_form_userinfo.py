"""Userinfo in an absolute-form target."""

status = 400
