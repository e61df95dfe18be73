"""Config stores: where the routing table lives. `open_store(url)` picks one.

* ``file:PATH`` (also ``file:///abs/path``) → `FileStore`
* ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` → `RedisStore`
"""

from __future__ import annotations

from balancer.stores.base import (
    CorruptStore,
    Store,
    StoreError,
    StoreLost,
    StoreUnavailable,
    TableChange,
    TableData,
    VersionConflict,
)
from balancer.stores.urls import StoreUrlError, redact_url

__all__ = ["CorruptStore", "Store", "StoreError", "StoreLost", "StoreUnavailable",
           "StoreUrlError", "TableChange", "TableData", "VersionConflict", "open_store",
           "redact_url"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://")
URL_FORMS = ("file:PATH, redis://[:password@]host:port/db, rediss://..., "
             "or redis+sentinel://host:port[,host:port]/service_name/db")


def open_store(url: str, namespace: str = "balancer", resync_interval: float = 5.0) -> Store:
    """The store a URL names. Raises `StoreUrlError` (a ValueError) for a bad URL,
    including a file path whose file cannot be created."""
    if not isinstance(url, str) or not url.strip():
        raise StoreUrlError(f"empty store URL; expected {URL_FORMS}")
    if url.startswith("file:"):
        from balancer.stores.file import FileStore

        path = url[len("file:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise StoreUrlError(f"{url}: the file path is missing; expected file:PATH")
        try:
            return FileStore(path)
        except StoreUnavailable as exc:
            raise StoreUrlError(str(exc)) from None
    if url.startswith(REDIS_SCHEMES):
        from balancer.stores.redis import RedisStore

        return RedisStore(url, namespace, resync_interval)
    raise StoreUrlError(f"unsupported store URL {redact_url(url)!r}; expected {URL_FORMS}")
