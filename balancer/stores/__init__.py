"""Config stores: where the routing table lives. `open_store(url)` picks one.

* ``file:PATH`` (also ``file:///abs/path``) → `FileStore`
* ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` → `RedisStore`
"""

from __future__ import annotations

from balancer.stores.base import (
    CorruptStore,
    HostRule,
    Store,
    StoreError,
    StoreFull,
    StoreLost,
    StoreNotReplicated,
    StoreUnavailable,
    TableChange,
    TableData,
    VersionConflict,
)
from balancer.stores.urls import FILE_SCHEME, StoreUrlError, redact_url, store_kind

__all__ = ["CorruptStore", "HostRule", "Store", "StoreError", "StoreFull", "StoreLost",
           "StoreNotReplicated", "StoreUnavailable", "StoreUrlError", "TableChange",
           "TableData", "VersionConflict", "open_store", "redact_url"]


def open_store(url: str, namespace: str = "balancer", resync_interval: float = 5.0,
               strict: bool = True) -> Store:
    """The store a URL names. Raises `StoreUrlError` (a ValueError) for a bad URL,
    including, when `strict`, a file path whose file cannot be created (`FileStore`)."""
    if store_kind(url) == "file":
        from balancer.stores.file import FileStore

        path = url[len(FILE_SCHEME):]
        if path.startswith("//"):
            path = path[2:]
        try:
            return FileStore(path, strict)
        except StoreUnavailable as exc:
            raise StoreUrlError(str(exc)) from None
    from balancer.stores.redis import RedisStore

    return RedisStore(url, namespace, resync_interval)
