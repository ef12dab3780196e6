"""Async views of the stores behind shared regions, and the version tokens they keep.

A shared region needs five operations of its store: read an entry together with the current
tokens of the tables it depends on, create missing tokens, write an entry only if the tokens
are unchanged, replace tokens (a commit's invalidation), and delete. A token is a random
string per table, replaced by every commit that writes the table; an entry records the tokens
it was filled under and is served only while they are all current. Random tokens rather than
counters mean an evicted or lost token can never come back equal to an old one.

``InProcessStore`` serves dogpile's ``memory`` backend and our bounded one, holding Python
objects as they are under in-process keys (nothing leaves the process, so a hit skips the
stable key); ``RedisStore`` (in ``_redis.py``) serves the asyncio redis backend under
stable string keys.
Any other backend would block the event loop or unpickle shared bytes, so it is refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dogpile.cache import CacheRegion, register_backend
from dogpile.cache.api import NO_VALUE
from dogpile.cache.backends.memory import MemoryBackend, MemoryPickleBackend

from ._exceptions import AsyncSessionCacheError
from ._memory import BoundedMemoryBackend
from ._payload import Payload
from ._shapes import Shape


def new_token() -> str:
    """A fresh random version token."""
    return os.urandom(8).hex()


@dataclass(slots=True, frozen=True)
class Stored:
    """An in-process entry: the payload, the tokens it was filled under, its deadline."""

    tokens: tuple[str, ...]
    expires_at: float
    payload: Payload

    @property
    def nbytes(self) -> int:
        return self.payload.nbytes


class Store(Protocol):
    """What a shared region asks of its backend. ``key`` arguments are what ``key_for``
    returned."""

    remote: bool
    """Whether calls cross the network (and so need a timeout)."""

    def key_for(self, shape: Shape, key: Hashable) -> Any:
        """The store's key for one execution (``key``: its in-process statement key).
        Raises ``UnstableKeyError`` when the store needs a stable key and none exists."""
        ...

    async def read(
        self, key: Any, token_keys: Sequence[str]
    ) -> tuple[Payload | None, tuple[str, ...] | None, list[str | None]]:
        """The payload under ``key`` (or None), the tokens it was filled under, and the
        current tokens of ``token_keys`` (None where missing)."""
        ...

    async def ensure_tokens(self, token_keys: Sequence[str]) -> list[str]:
        """The current tokens of ``token_keys``, creating the missing ones."""
        ...

    async def write(
        self,
        key: Any,
        payload: Payload,
        token_keys: Sequence[str],
        tokens: Sequence[str],
        ttl: float | None,
    ) -> int | None:
        """Store ``payload`` if ``token_keys`` still hold ``tokens``; the bytes written."""
        ...

    async def bump(self, token_keys: Sequence[str]) -> None:
        """Replace the tokens of ``token_keys``: every entry filled under them is stale."""
        ...

    async def delete(self, key: Any) -> None:
        """Drop the entry under ``key``."""
        ...

    async def acquire(self, key: Any, ttl: float) -> str | None:
        """Take the cross-process fill lock of ``key``; a token, or None if another holds it."""
        ...

    async def release(self, key: Any, token: str) -> None:
        """Give back a fill lock taken with ``token``."""
        ...

    async def is_locked(self, key: Any) -> bool:
        """Whether some process holds the fill lock of ``key``."""
        ...


class InProcessStore:
    """A dogpile in-memory backend used directly: no serialisation, no I/O, no thread."""

    remote = False

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def key_for(self, shape: Shape, key: Hashable) -> Hashable:
        """The shape's digest (it covers the dialect) and the key's values: equal for equal
        executions in this process, with no text form to build."""
        return (shape.digest, key[1:])  # type: ignore[index]

    def _tokens(self, token_keys: Sequence[str]) -> list[str | None]:
        get = self.backend.get
        tokens: list[str | None] = []
        for token_key in token_keys:
            token = get(token_key)
            tokens.append(None if token is NO_VALUE else token)
        return tokens

    async def read(
        self, key: Any, token_keys: Sequence[str]
    ) -> tuple[Payload | None, tuple[str, ...] | None, list[str | None]]:
        return self.read_now(key, token_keys)

    def read_now(
        self, key: Any, token_keys: Sequence[str]
    ) -> tuple[Payload | None, tuple[str, ...] | None, list[str | None]]:
        """``read`` without a coroutine: what a hit uses (one ``get_multi`` for the entry
        and its tokens)."""
        stored, *found = self.backend.get_multi([key, *token_keys])
        tokens = [None if token is NO_VALUE else token for token in found]
        if not isinstance(stored, Stored):
            return None, None, tokens
        if stored.expires_at <= time.monotonic():
            self.backend.delete(key)
            return None, None, tokens
        return stored.payload, stored.tokens, tokens

    async def ensure_tokens(self, token_keys: Sequence[str]) -> list[str]:
        current = self._tokens(token_keys)
        for position, token in enumerate(current):
            if token is None:
                current[position] = new_token()
                self.backend.set(token_keys[position], current[position])
        return current  # type: ignore[return-value]

    async def write(
        self,
        key: Any,
        payload: Payload,
        token_keys: Sequence[str],
        tokens: Sequence[str],
        ttl: float | None,
    ) -> int | None:
        if self._tokens(token_keys) != list(tokens):
            return None
        expires_at = float("inf") if ttl is None else time.monotonic() + ttl
        self.backend.set(key, Stored(tuple(tokens), expires_at, payload))
        return payload.nbytes

    async def bump(self, token_keys: Sequence[str]) -> None:
        for token_key in token_keys:
            self.backend.set(token_key, new_token())

    async def delete(self, key: Any) -> None:
        self.backend.delete(key)

    async def acquire(self, key: Any, ttl: float) -> str | None:
        return "in-process"  # one process: the region's single-flight already serialises

    async def release(self, key: Any, token: str) -> None:
        return None

    async def is_locked(self, key: Any) -> bool:
        return False


REDIS_BACKEND_NAME = "async_session_cache.redis"
# Registered by module path so that redis-py is imported only by regions that use it.
register_backend(REDIS_BACKEND_NAME, "async_session_cache._redis", "AsyncRedisBackend")  # type: ignore[no-untyped-call]


def store_for(name: str, region: CacheRegion) -> Store:
    """The store adapter for ``region``'s backend; a clear error for unsupported ones."""
    if not region.is_configured:
        raise AsyncSessionCacheError(f"region {name!r} is not configured (call .configure())")
    backend = region.actual_backend
    if type(backend).__module__ == "async_session_cache._redis":
        from ._redis import RedisStore

        return RedisStore(backend)
    if isinstance(backend, MemoryBackend | BoundedMemoryBackend) and not isinstance(
        backend, MemoryPickleBackend
    ):
        return InProcessStore(backend)
    raise AsyncSessionCacheError(
        f"region {name!r} uses {type(backend).__module__}.{type(backend).__name__}, which "
        "would block the event loop or unpickle shared bytes; use 'async_session_cache.memory'"
        ", 'dogpile.cache.memory' or 'async_session_cache.redis'"
    )
