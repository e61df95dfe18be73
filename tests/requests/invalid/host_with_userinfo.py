"""Userinfo in Host."""

status = 400
