"""A bounded in-process dogpile.cache backend: LRU by entries and by bytes.

``dogpile.cache.memory`` grows without limit (cacheops #340). This backend, registered as
``async_session_cache.memory``, keeps at most ``max_entries`` values and ``max_bytes`` of
estimated payload, evicting the least recently used, and counts its evictions::

    make_region().configure(
        "async_session_cache.memory", arguments={"max_entries": 10_000, "max_bytes": 64 << 20}
    )

Values are stored as they are (nothing is copied or pickled). A value's size is its
``nbytes`` attribute when it has one (payloads do), else ``sys.getsizeof``. The lock is a
short critical section around dict operations, never held across an await.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from dogpile.cache import register_backend
from dogpile.cache.api import NO_VALUE, CacheBackend, NoValue

BACKEND_NAME = "async_session_cache.memory"


class BoundedMemoryBackend(CacheBackend):
    """An LRU dict bounded by entry count and estimated bytes."""

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        self.max_entries = int(arguments.get("max_entries", 10_000))
        self.max_bytes = int(arguments.get("max_bytes", 64 << 20))
        if self.max_entries < 1 or self.max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self._data: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.evictions = 0

    def get(self, key: Any) -> Any | NoValue:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return NO_VALUE
            self._data.move_to_end(key)
            return item[0]

    def get_multi(self, keys: Iterable[Any]) -> list[Any]:
        values: list[Any] = []
        with self._lock:
            data = self._data
            for key in keys:
                item = data.get(key)
                if item is None:
                    values.append(NO_VALUE)
                else:
                    data.move_to_end(key)
                    values.append(item[0])
        return values

    def set(self, key: Any, value: Any) -> None:
        size = _size_of(value)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._data[key] = (value, size)
            self.bytes += size
            while len(self._data) > self.max_entries or (
                self.bytes > self.max_bytes and len(self._data) > 1
            ):
                _, (_, evicted) = self._data.popitem(last=False)
                self.bytes -= evicted
                self.evictions += 1

    def set_multi(self, mapping: Mapping[Any, Any]) -> None:
        for key, value in mapping.items():
            self.set(key, value)

    def delete(self, key: Any) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[1]

    def delete_multi(self, keys: Iterable[Any]) -> None:
        for key in keys:
            self.delete(key)

    def __len__(self) -> int:
        return len(self._data)


def _size_of(value: Any) -> int:
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    return sys.getsizeof(value)


register_backend(BACKEND_NAME, __name__, "BoundedMemoryBackend")  # type: ignore[no-untyped-call]
