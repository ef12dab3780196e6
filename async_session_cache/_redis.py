"""The redis backend of shared regions, on redis-py's asyncio client.

Registered with dogpile.cache as ``async_session_cache.redis``::

    make_region().configure(
        "async_session_cache.redis",
        arguments={"url": "redis://127.0.0.1:6379/0", "prefix": "asc", "timeout": 0.25},
    )

Every operation is one round trip (a pipeline or a Lua script) on an asyncio connection, so
the event loop never blocks on the network. The dogpile synchronous API (``region.get``) is
refused: it would block the loop, and pickle what it stores.

``timeout`` bounds each socket operation and the wait for one of ``max_connections`` pooled
connections (default 50); the region's policy bounds whole calls too.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from dogpile.cache.api import CacheBackend

from ._exceptions import AsyncSessionCacheError
from ._payload import Payload, dumps, loads
from ._shapes import Shape, stable_key
from ._stores import new_token

_ENSURE_TOKENS = """
for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i], 'NX') end
return redis.call('MGET', unpack(KEYS))
"""

_WRITE_IF_CURRENT = """
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) ~= ARGV[i + 1] then return 0 end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class AsyncRedisBackend(CacheBackend):
    """Connection settings and per-event-loop asyncio clients for one redis database."""

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        try:
            self.url = str(arguments["url"])
        except KeyError:
            raise AsyncSessionCacheError("the redis backend needs arguments={'url': ...}") from None
        self.prefix = str(arguments.get("prefix", "asc"))
        self.timeout = float(arguments.get("timeout", 0.25))
        self.max_connections = int(arguments.get("max_connections", 50))
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary()
        )

    def client(self) -> aioredis.Redis:
        """The asyncio client of the running event loop (clients are bound to one loop)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # A blocking pool makes a burst of callers wait for a connection (bounded by
            # ``timeout``) instead of failing past max_connections, which would look like
            # an outage.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.max_connections,
                timeout=self.timeout,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry_on_timeout=False,
            )
            client = aioredis.Redis.from_pool(pool)  # the client owns and closes the pool
            self._clients[loop] = client
        return client

    async def aclose(self) -> None:
        """Close the running loop's client and its connections."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def _refuse(self) -> AsyncSessionCacheError:
        return AsyncSessionCacheError(
            "the async_session_cache.redis backend has no blocking API; "
            "use cached_execute() / invalidate() (and FromCache) instead"
        )

    def get(self, key: str) -> Any:
        raise self._refuse()

    def set(self, key: str, value: Any) -> None:
        raise self._refuse()

    def delete(self, key: str) -> None:
        raise self._refuse()


class RedisStore:
    """``Store`` over ``AsyncRedisBackend``: one round trip per operation."""

    remote = True

    def __init__(self, backend: AsyncRedisBackend) -> None:
        self.backend = backend
        self._prefix = backend.prefix + ":"

    def key_for(self, shape: Shape, key: Hashable) -> str:
        """The stable string key: equal in every process for equal executions."""
        return stable_key(shape, key)

    def _key(self, key: str) -> str:
        return self._prefix + key

    def _keys(self, keys: Sequence[str]) -> list[str]:
        return [self._prefix + key for key in keys]

    async def read(
        self, key: str, token_keys: Sequence[str]
    ) -> tuple[Payload | None, tuple[str, ...] | None, list[str | None]]:
        # One MGET for the entry and its tokens: one command, one round trip.
        found = cast(  # bytes: the backend does not ask redis-py to decode responses
            "list[bytes | None]",
            await self.backend.client().mget([self._key(key), *self._keys(token_keys)]),
        )
        data, *raw_tokens = found
        tokens = [None if t is None else t.decode() for t in raw_tokens]
        if data is None:
            return None, None, tokens
        stored_tokens, payload = loads(data)
        return payload, stored_tokens, tokens

    async def ensure_tokens(self, token_keys: Sequence[str]) -> list[str]:
        client = self.backend.client()
        fresh = [new_token() for _ in token_keys]
        raw = await client.eval(_ENSURE_TOKENS, len(token_keys), *self._keys(token_keys), *fresh)
        return [t.decode() for t in raw]

    async def write(
        self,
        key: str,
        payload: Payload,
        token_keys: Sequence[str],
        tokens: Sequence[str],
        ttl: float | None,
    ) -> int | None:
        data = dumps(tokens, payload)
        ttl_ms = 0 if ttl is None else max(1, int(ttl * 1000))
        written = await self.backend.client().eval(
            _WRITE_IF_CURRENT,
            1 + len(token_keys),
            self._key(key),
            *self._keys(token_keys),
            data,
            ttl_ms,
            *tokens,
        )
        return len(data) if written else None

    async def bump(self, token_keys: Sequence[str]) -> None:
        if token_keys:
            await self.backend.client().mset({k: new_token() for k in self._keys(token_keys)})

    async def delete(self, key: str) -> None:
        await self.backend.client().delete(self._key(key))

    async def acquire(self, key: str, ttl: float) -> str | None:
        token = new_token()
        taken = await self.backend.client().set(
            self._key("lock:" + key), token, nx=True, px=max(1, int(ttl * 1000))
        )
        return token if taken else None

    async def release(self, key: str, token: str) -> None:
        await self.backend.client().eval(_RELEASE, 1, self._key("lock:" + key), token)

    async def is_locked(self, key: str) -> bool:
        return bool(await self.backend.client().exists(self._key("lock:" + key)))
