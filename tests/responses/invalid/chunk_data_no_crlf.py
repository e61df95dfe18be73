"""Chunk data longer than its size."""

status = 502
