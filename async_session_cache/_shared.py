"""Shared regions: get-or-fill over a ``Store``, asyncio-native, failing open.

- **Freshness.** Every entry carries the version tokens of the tables it read, taken before
  its query ran; it is served only while they are all current. A commit replaces the tokens
  of the tables its transaction wrote before ``commit()`` returns, so no entry filled before
  (or while racing) the commit is served after it.
- **Single-flight.** Concurrent misses of one key in this process share one query through an
  ``asyncio.Future`` (never dogpile's thread lock: pitfall 1); across processes a lock with a
  timeout in the store lets one process fill while the others poll for its result, and a
  dead holder's lock expires.
- **Faults.** Every store call is bounded by the region's timeout. A failure is a miss: the
  rows come from the database, a warning is logged once per outage, ``errors`` counts it,
  and the store is retried after ``retry_interval``. Commit invalidations that could not be
  written are kept and written before the region serves anything again.
- **Transactions.** A session's reads of tables it has written in its open transaction never
  touch shared regions (its uncommitted rows must not reach other requests); they use the
  local region, which gives read-your-writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Final, TypeVar

from dogpile.cache import CacheRegion
from sqlalchemy.engine import Result
from sqlalchemy.sql import Executable

from ._exceptions import UncacheableStatementWarning
from ._flight import run_once
from ._local import LocalStore
from ._payload import Payload, UnencodableResult, UnreadablePayload, encode, materialize
from ._results import FrozenRows
from ._shapes import Shape, UnstableKeyError, shape_of, stable_key
from ._statements import ALL_TABLES
from ._stats import RegionStats
from ._stores import Stored, store_for

logger = logging.getLogger("async_session_cache")

T = TypeVar("T")
RunQuery = Callable[[], Awaitable[Result[Any]]]


class _Failed:
    """A store call that failed or was skipped during an outage."""


FAILED: Final = _Failed()
_EVERYTHING: Final = "v:*"
_ANY_WRITE: Final = "v:+"


def token_keys_for(tables: frozenset[str]) -> list[str]:
    """Token keys an entry depends on: the global epoch, and its tables (or any write)."""
    keys = [_EVERYTHING]
    if ALL_TABLES in tables:
        keys.append(_ANY_WRITE)
    keys.extend(sorted(f"v:t:{table}" for table in tables if table != ALL_TABLES))
    return keys


def bumped_keys_for(tables: frozenset[str]) -> list[str]:
    """Token keys a commit that wrote ``tables`` replaces."""
    if ALL_TABLES in tables:
        return [_EVERYTHING]
    return [_ANY_WRITE, *sorted(f"v:t:{table}" for table in tables)]


class SharedRegion:
    """The policy of one named shared region of a ``SessionCache``."""

    def __init__(
        self,
        name: str,
        region: CacheRegion,
        stats: RegionStats,
        *,
        timeout: float,
        lock_timeout: float,
        retry_interval: float,
    ) -> None:
        self.name = name
        self.store = store_for(name, region)
        self.stats = stats
        self.timeout = timeout
        self.lock_timeout = lock_timeout
        self.retry_interval = retry_interval
        expiration = region.expiration_time
        self.default_ttl: float | None = expiration if expiration and expiration > 0 else None
        self.inflight: dict[Hashable, asyncio.Future[Payload | None]] = {}
        self._token_keys: dict[frozenset[str], list[str]] = {}
        self._outage_since: float | None = None
        self._retry_at = 0.0
        self._pending_bumps: set[str] = set()
        self._warned: set[str] = set()

    # -- reads ---------------------------------------------------------------------------

    async def execute(
        self,
        local: LocalStore,
        statement: Executable,
        key: Hashable,
        expiration_time: float | None,
        run: RunQuery | None = None,
    ) -> Result[Any] | None:
        """The result of ``statement`` through this region, or ``None`` when it must take
        the local region instead (uncommitted writes, an unstable key)."""
        shape = shape_of(statement, key, local.dialect)
        if self._touches_uncommitted(local, shape):
            return None
        try:
            skey = stable_key(shape, key)
        except UnstableKeyError:
            self._warn_once(
                shape.digest,
                "a bound value has no stable text form (an object id); "
                "it is cached in the local region only",
            )
            return None
        token_keys = self._keys_for(shape.tables)
        tokens: list[str] | None = None
        if not self._pending_bumps or await self._pending_bumps_written():
            found = await self._read(skey, token_keys)
            if not isinstance(found, _Failed):
                stored, current = found
                if stored is not None and stored.tokens == tuple(current):
                    result = self._rebuild(stored.payload, shape, local)
                    if result is not None:
                        self.stats.hits += 1
                        return result
                if None not in current:
                    tokens = current  # type: ignore[assignment]
        run = run or _default_run(local, statement)
        return await self._fill_once(local, shape, skey, token_keys, tokens, expiration_time, run)

    async def _read(
        self, skey: str, token_keys: list[str]
    ) -> tuple[Stored | None, list[str | None]] | _Failed:
        try:
            found = await self._guard(self.store.read(skey, token_keys))
        except UnreadablePayload:
            self.stats.errors += 1  # foreign, truncated or old bytes: a miss, never a crash
            return None, [None] * len(token_keys)
        if isinstance(found, _Failed):
            return found
        payload, stored_tokens, current = found
        if payload is None or stored_tokens is None:
            return None, current
        return Stored(stored_tokens, 0.0, payload), current

    async def _fill_once(
        self,
        local: LocalStore,
        shape: Shape,
        skey: str,
        token_keys: list[str],
        tokens: list[str] | None,
        expiration_time: float | None,
        run: RunQuery,
    ) -> Result[Any]:
        """Fill ``skey`` once per process; waiters rebuild the filler's payload."""
        filled: Result[Any] | None = None

        async def fill() -> Payload | None:
            nonlocal filled
            filled, payload = await self._fill(
                local, shape, skey, token_keys, tokens, expiration_time, run
            )
            return payload

        payload, ran = await run_once(self.inflight, skey, fill)
        if ran:
            assert filled is not None
            return filled
        if payload is not None:
            result = self._rebuild(payload, shape, local)
            if result is not None:
                self.stats.coalesced += 1
                return result
        self.stats.misses += 1  # the filler could not share its rows: read for ourselves
        return await run()

    async def _fill(
        self,
        local: LocalStore,
        shape: Shape,
        skey: str,
        token_keys: list[str],
        tokens: list[str] | None,
        expiration_time: float | None,
        run: RunQuery,
    ) -> tuple[Result[Any], Payload | None]:
        lock = await self._guard(self.store.acquire(skey, self.lock_timeout))
        if lock is None:
            filled = await self._wait_for_other_process(local, shape, skey, token_keys)
            if filled is not None:
                return filled
        try:
            if tokens is None:
                ensured = await self._guard(self.store.ensure_tokens(token_keys))
                tokens = None if isinstance(ensured, _Failed) else ensured
            rows = FrozenRows(await run())
            self.stats.misses += 1
            payload: Payload | None = None
            try:
                payload = encode(rows.frozen, rows.requires_unique, shape)
            except UnencodableResult as exc:
                self._warn_once(shape.digest, f"{exc}; it is not cached")
            if payload is not None and tokens is not None:
                ttl = expiration_time if expiration_time is not None else self.default_ttl
                try:
                    written = await self._guard(
                        self.store.write(skey, payload, token_keys, tokens, ttl)
                    )
                except UnencodableResult as exc:
                    self._warn_once(shape.digest, f"{exc}; it is not cached")
                    written = FAILED
                if isinstance(written, int):
                    self.stats.fills += 1
                    self.stats.bytes += written
            return rows.replay(), payload
        finally:
            if isinstance(lock, str):
                await self._guard(self.store.release(skey, lock))

    async def _wait_for_other_process(
        self, local: LocalStore, shape: Shape, skey: str, token_keys: list[str]
    ) -> tuple[Result[Any], Payload] | None:
        """Poll for the fill another process holds the lock for; None when it ends (or its
        holder dies, or the lock times out) without a usable entry."""
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.002
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            found = await self._read(skey, token_keys)
            if isinstance(found, _Failed):
                return None
            stored, current = found
            if stored is not None and stored.tokens == tuple(current):
                result = self._rebuild(stored.payload, shape, local)
                if result is None:
                    return None
                self.stats.coalesced += 1
                return result, stored.payload
            if await self._guard(self.store.is_locked(skey)) is not True:
                return None
        return None

    # -- invalidation --------------------------------------------------------------------

    async def invalidate(self, local: LocalStore, statement: Executable, key: Hashable) -> None:
        """Drop the entry of one execution of ``statement``."""
        shape = shape_of(statement, key, local.dialect)
        try:
            skey = stable_key(shape, key)
        except UnstableKeyError:
            return
        if not isinstance(await self._guard(self.store.delete(skey)), _Failed):
            self.stats.invalidations += 1

    async def bump(self, tables: frozenset[str]) -> None:
        """Make every entry that read one of ``tables`` stale (a transaction committed)."""
        keys = bumped_keys_for(tables)
        if isinstance(await self._guard(self.store.bump(keys)), _Failed):
            self._pending_bumps.update(keys)
            logger.error(
                "cache region %r: could not invalidate %s after a commit; the region serves "
                "nothing until it can",
                self.name,
                ", ".join(sorted(tables)),
            )
        else:
            self.stats.invalidations += 1

    async def _pending_bumps_written(self) -> bool:
        """Write invalidations a past outage held back; whether the region may serve."""
        if not self._pending_bumps:
            return True
        keys = sorted(self._pending_bumps)
        if isinstance(await self._guard(self.store.bump(keys)), _Failed):
            return False
        self._pending_bumps.difference_update(keys)
        return True

    # -- helpers -------------------------------------------------------------------------

    def _rebuild(self, payload: Payload, shape: Shape, local: LocalStore) -> Result[Any] | None:
        """The payload's rows in the caller's session; None (counted) if it cannot be read."""
        try:
            return materialize(payload, shape, local.sync_session)
        except UnreadablePayload:
            self.stats.errors += 1
            return None

    def _keys_for(self, tables: frozenset[str]) -> list[str]:
        keys = self._token_keys.get(tables)
        if keys is None:
            keys = self._token_keys[tables] = token_keys_for(tables)
        return keys

    @staticmethod
    def _touches_uncommitted(local: LocalStore, shape: Shape) -> bool:
        written = local.uncommitted_writes
        if not written:
            return False
        return (
            ALL_TABLES in written
            or ALL_TABLES in shape.tables
            or not written.isdisjoint(shape.tables)
        )

    async def _guard(self, operation: Awaitable[T]) -> T | _Failed:
        """Run one store call within the timeout; a failure is counted, logged once per
        outage, and returned as ``FAILED``."""
        if self._retry_at and time.monotonic() < self._retry_at:
            if asyncio.iscoroutine(operation):
                operation.close()
            return FAILED
        try:
            if self.store.remote:
                async with asyncio.timeout(self.timeout):
                    value = await operation
            else:
                value = await operation
        except (UnreadablePayload, UnencodableResult):
            raise  # the store answered; the data is the problem, not the store
        except Exception as exc:
            self._fault(exc)
            return FAILED
        if self._outage_since is not None:
            logger.warning(
                "cache region %r recovered after %.1f s",
                self.name,
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None
        self._retry_at = 0.0
        return value

    def _fault(self, exc: Exception) -> None:
        self.stats.errors += 1
        now = time.monotonic()
        self._retry_at = now + self.retry_interval
        if self._outage_since is None:
            self._outage_since = now
            logger.warning(
                "cache region %r is unavailable (%s: %s); reading from the database until it "
                "recovers",
                self.name,
                type(exc).__name__,
                exc,
            )

    def _warn_once(self, digest: str, reason: str) -> None:
        self.stats.bypasses += 1
        if digest not in self._warned:
            self._warned.add(digest)
            warnings.warn(
                f"region {self.name!r} cannot share this statement's result: {reason}",
                UncacheableStatementWarning,
                stacklevel=4,
            )


def _default_run(local: LocalStore, statement: Executable) -> RunQuery:
    async def run() -> Result[Any]:
        async with local.lock:
            return await local.session.execute(statement)

    return run
