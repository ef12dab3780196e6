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
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from dogpile.cache import CacheRegion
from sqlalchemy.engine import Result
from sqlalchemy.sql import Executable

from ._exceptions import UncacheableStatementWarning
from ._flight import run_once
from ._local import LocalStore
from ._payload import Payload, UnencodableResult, UnreadablePayload, fetch_payload, materialize
from ._shapes import Shape, UnstableKeyError, shape_of
from ._statements import ALL_TABLES
from ._stats import RegionStats, StatementStats
from ._stores import InProcessStore, store_for
from ._verify import ShadowVerifier

logger = logging.getLogger("async_session_cache")

T = TypeVar("T")
RunQuery = Callable[[], Awaitable[Result[Any]]]
"""Runs the statement in the caller's session (a fallback when rows cannot be shared)."""
FetchPayload = Callable[[], Awaitable[Payload]]
"""Runs the statement in a clean session on the caller's connection and encodes the rows."""


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
        verifier: ShadowVerifier | None = None,
    ) -> None:
        self.name = name
        self.verifier = verifier
        self.store = store_for(name, region)
        self._in_process = self.store if isinstance(self.store, InProcessStore) else None
        """The store again when hits can be read without awaiting (in-process)."""
        self.stats = stats
        self.timeout = timeout
        self.lock_timeout = lock_timeout
        self.retry_interval = retry_interval
        expiration = region.expiration_time
        self.default_ttl: float | None = expiration if expiration and expiration > 0 else None
        self.inflight: dict[Hashable, asyncio.Future[Payload | None]] = {}
        """Reads and fills under way in this process, by store key."""
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
        fetch: FetchPayload | None = None,
    ) -> Result[Any] | None:
        """The result of ``statement`` through this region, or ``None`` when it must take
        the local region instead (uncommitted writes, an unstable key). ``run`` and
        ``fetch`` override how a miss executes (the ORM-option route runs inside
        SQLAlchemy's greenlet)."""
        shape = shape_of(statement, key, local.dialect)
        if self._touches_uncommitted(local, shape):
            return None
        try:
            skey = self.store.key_for(shape, key)
        except UnstableKeyError:
            self._warn_once(
                shape.digest,
                "a bound value has no stable text form (an object id); "
                "it is cached in the local region only",
            )
            return None
        token_keys = self._keys_for(shape.tables)
        counters = self.stats.of(key, statement)
        in_process = self._in_process
        # An in-process read is plain Python (no coroutine, no I/O): only misses need sharing.
        if (
            in_process is not None
            and skey not in self.inflight
            and (not self._pending_bumps or await self._pending_bumps_written())
        ):
            found = self._current_in_process(in_process, local, shape, skey, token_keys, counters)
            if found is not None:
                counters.hit()
                if self.verifier is not None:
                    await self._maybe_verify(local, statement, shape, found[1])
                return found[0]
        call = _Call(
            local=local,
            shape=shape,
            skey=skey,
            token_keys=token_keys,
            expiration_time=expiration_time,
            statement=statement,
            run_override=run,
            fetch_override=fetch,
            counters=counters,
        )
        if in_process is not None:
            return await self._once(call, read=False)
        # A network read is shared too: a burst of requests for one key makes one round
        # trip, not a queue of them that times out.
        return await self._once(call, read=True, statement=statement)

    def _current_in_process(
        self,
        store: InProcessStore,
        local: LocalStore,
        shape: Shape,
        skey: Hashable,
        token_keys: list[str],
        counters: StatementStats,
    ) -> tuple[Result[Any], Payload] | None:
        """The in-process entry rebuilt in the caller's session if it is current; None
        (a stale one counted as an invalidation) otherwise."""
        payload, stored_tokens, current = store.read_now(skey, token_keys)
        if payload is None or stored_tokens is None:
            return None
        if stored_tokens != tuple(current):
            counters.invalidations += 1  # filled before a commit to one of its tables
            return None
        result = self._rebuild(payload, shape, local)
        return None if result is None else (result, payload)

    async def _lookup(
        self, call: _Call, statement: Executable
    ) -> tuple[Result[Any], Payload] | None:
        """The current entry rebuilt in the caller's session, counted as a hit (and shadow
        verified when sampled); None on a miss."""
        if self._pending_bumps and not await self._pending_bumps_written():
            return None
        found = await self._read(call, first=True)
        if found is not None:
            call.counters.hit()
            await self._maybe_verify(call.local, statement, call.shape, found[1])
        return found

    async def _maybe_verify(
        self, local: LocalStore, statement: Executable, shape: Shape, payload: Payload
    ) -> None:
        """Shadow verify a sampled hit: a second rebuild against an uncached read."""
        if self.verifier is not None and self.verifier.wants():
            second = self._rebuild(payload, shape, local)
            if second is not None:
                await self.verifier.check(local, statement, second, self.stats)

    async def _read(
        self, call: _Call, *, first: bool = False
    ) -> tuple[Result[Any], Payload] | None:
        """The current entry of ``call`` rebuilt in its session, if there is one; notes the
        tables' current tokens on ``call`` for a fill."""
        try:
            found = await self._guard(self.store.read(call.skey, call.token_keys))
        except UnreadablePayload:
            self.stats.errors += 1  # foreign, truncated or old bytes: a miss, never a crash
            return None
        if isinstance(found, _Failed):
            return None
        payload, stored_tokens, current = found
        if None not in current:
            call.tokens = current  # type: ignore[assignment]
        if payload is None or stored_tokens is None:
            return None
        if stored_tokens != tuple(current):
            if first:
                call.counters.invalidations += 1  # filled before a commit to one of its tables
            return None
        result = self._rebuild(payload, call.shape, call.local)
        return None if result is None else (result, payload)

    async def _once(
        self, call: _Call, *, read: bool, statement: Executable | None = None
    ) -> Result[Any]:
        """Read (when ``read``) and else fill ``call``'s key once per process; concurrent
        callers of the key rebuild the first caller's payload in their own sessions."""
        produced: Result[Any] | None = None

        async def lead() -> Payload | None:
            nonlocal produced
            if read and statement is not None:
                found = await self._lookup(call, statement)
                if found is not None:
                    produced = found[0]
                    return found[1]
            produced, payload = await self._fill(call)
            return payload

        payload, ran = await run_once(self.inflight, call.skey, lead)
        if ran:
            assert produced is not None
            return produced
        if payload is not None:
            result = self._rebuild(payload, call.shape, call.local)
            if result is not None:
                self.stats.coalesced += 1
                return result
        return await call.run()  # the first caller could not share its rows

    async def _fill(self, call: _Call) -> tuple[Result[Any], Payload | None]:
        """Run the query (under the cross-process fill lock) and store its payload."""
        lock = await self._guard(self.store.acquire(call.skey, self.lock_timeout))
        if lock is None:
            filled = await self._wait_for_other_process(call)
            if filled is not None:
                self.stats.coalesced += 1
                return filled
        try:
            if isinstance(lock, str) and self.store.remote:
                # Another process (or an earlier fill here) may have stored it since our read.
                found = await self._read(call)
                if found is not None:
                    self.stats.coalesced += 1
                    return found
            if call.tokens is None:
                ensured = await self._guard(self.store.ensure_tokens(call.token_keys))
                call.tokens = None if isinstance(ensured, _Failed) else ensured
            began = time.perf_counter()
            try:
                payload = await call.fetch()
            except UnencodableResult as exc:
                self._warn_once(call.shape.digest, f"{exc}; it is not cached")
                call.counters.miss(time.perf_counter() - began)
                return await call.run(), None
            call.counters.miss(time.perf_counter() - began)
            await self._store(call, payload)
            result = self._rebuild(payload, call.shape, call.local)
            return (result if result is not None else await call.run()), payload
        finally:
            if isinstance(lock, str):
                await self._guard(self.store.release(call.skey, lock))

    async def _store(self, call: _Call, payload: Payload) -> None:
        """Write the fill if its tables' tokens are still those read before the query ran."""
        if call.tokens is None:
            return
        ttl = call.expiration_time if call.expiration_time is not None else self.default_ttl
        try:
            written = await self._guard(
                self.store.write(call.skey, payload, call.token_keys, call.tokens, ttl)
            )
        except UnencodableResult as exc:
            self._warn_once(call.shape.digest, f"{exc}; it is not cached")
            return
        if isinstance(written, int):
            call.counters.fill(written)

    async def _wait_for_other_process(self, call: _Call) -> tuple[Result[Any], Payload] | None:
        """Poll for the fill another process holds the lock for; None when it ends (or its
        holder dies, or the lock times out) without a usable entry."""
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.002
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            found = await self._read(call)
            if found is not None:
                return found
            if await self._guard(self.store.is_locked(call.skey)) is not True:
                return None
        return None

    # -- invalidation --------------------------------------------------------------------

    async def invalidate(self, local: LocalStore, statement: Executable, key: Hashable) -> None:
        """Drop the entry of one execution of ``statement``."""
        shape = shape_of(statement, key, local.dialect)
        try:
            skey = self.store.key_for(shape, key)
        except UnstableKeyError:
            return
        if not isinstance(await self._guard(self.store.delete(skey)), _Failed):
            self.stats.invalidated(key)

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


@dataclass(slots=True)
class _Call:
    """One read through a shared region: where it runs, what it keys, how it fills.

    The ways to run the query are made only when a miss needs them, not on every hit."""

    local: LocalStore
    shape: Shape
    skey: Hashable
    token_keys: list[str]
    expiration_time: float | None
    statement: Executable
    run_override: RunQuery | None
    fetch_override: FetchPayload | None
    counters: StatementStats
    tokens: list[str] | None = None
    """Current tokens of ``token_keys`` read before the query ran (None: unknown)."""

    async def run(self) -> Result[Any]:
        """The statement's result in the caller's session (when rows cannot be shared)."""
        if self.run_override is not None:
            return await self.run_override()
        async with self.local.lock:
            return await self.local.session.execute(self.statement)

    async def fetch(self) -> Payload:
        """The statement's rows, read in a clean session on the caller's connection."""
        if self.fetch_override is not None:
            return await self.fetch_override()
        statement, shape = self.statement, self.shape
        async with self.local.lock:
            return await self.local.session.run_sync(
                lambda session: fetch_payload(session, statement, shape)
            )
