"""Chunk data ended by a bare LF."""

status = 400
