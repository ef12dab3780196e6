"""``cached_execute`` and ``invalidate``: the get-or-fill policy of the local region.

A hit is pure Python on the caller's task: key the statement, look it up, check its ORM
instances are still current, replay. A miss runs the query under the session's lock (sibling
tasks share the session: pitfall 7), and concurrent misses of one key share one query
(single-flight on an ``asyncio.Future``, never a thread lock: pitfall 1).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Hashable
from typing import Any, TypeVarTuple, overload

from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import Executable
from sqlalchemy.sql.selectable import TypedReturnsRows

from ._cache import LOCAL, SessionCache, current_scope
from ._exceptions import OutsideScopeError, UncacheableStatementWarning
from ._flight import run_once
from ._local import LocalStore, store_of
from ._results import FrozenRows, has_pending_changes
from ._statements import must_read_live, require_select, statement_key, tables_read

_Ts = TypeVarTuple("_Ts")


@overload
async def cached_execute(
    statement: TypedReturnsRows[*_Ts],
    *,
    region: str = ...,
    expiration_time: float | None = ...,
    session: AsyncSession | None = ...,
) -> Result[*_Ts]: ...


@overload
async def cached_execute(
    statement: Executable,
    *,
    region: str = ...,
    expiration_time: float | None = ...,
    session: AsyncSession | None = ...,
) -> Result[*tuple[Any, ...]]: ...


async def cached_execute(
    statement: Executable,
    *,
    region: str = LOCAL,
    expiration_time: float | None = None,
    session: AsyncSession | None = None,
) -> Result[*tuple[Any, ...]]:
    """Execute a SELECT through the cache; return what ``AsyncSession.execute`` would.

    The key covers the statement's structure, bound values, loader and execution options.
    On a miss the statement runs on the scope's session (or ``session``), the buffered
    result is frozen and stored; a hit replays it without SQL, ORM instances being the
    session's own. ``region`` names a shared region of the SessionCache (default: the
    scope's local region); ``expiration_time`` (seconds) bounds how long the entry is served.

    Raises ``OutsideScopeError`` outside any scope, ``NotASelectError`` for writes and
    ``UnknownRegionError`` for a region the cache was not configured with. A SELECT that
    SQLAlchemy cannot key runs uncached with an ``UncacheableStatementWarning``.
    """
    store = _resolve_store(session, "cached_execute()")
    shared = store.owner.shared(region)
    statement = require_select(statement)
    if expiration_time is not None and expiration_time <= 0:
        raise ValueError("expiration_time must be a positive number of seconds or None")
    if store.sync_session.autoflush and has_pending_changes(store.sync_session):
        await _flush_pending(store)
    key = None if must_read_live(statement) else _key_or_warn(statement)
    if key is None:
        (store.stats if shared is None else shared.stats).bypasses += 1
        return await _execute_uncached(store, statement)
    if shared is not None:
        result = await shared.execute(store, statement, key, expiration_time)
        if result is not None:
            return result
    rows = store.lookup(key)
    if rows is not None:
        store.stats.of(key, statement).hit()
        verifier = store.owner.verifier
        if verifier is not None and verifier.wants():
            await verifier.check(store, statement, rows.replay(), store.stats)
        return rows.replay()
    rows = await _fill_once(store, key, statement, expiration_time)
    return rows.replay()


async def invalidate(statement: Executable, *, region: str = LOCAL) -> None:
    """Drop the cached result of ``statement`` in ``region`` for the current scope."""
    store = _resolve_store(None, "invalidate()")
    shared = store.owner.shared(region)
    statement = require_select(statement)
    key = statement_key(statement)
    if key is None:
        return
    if shared is not None:
        await shared.invalidate(store, statement, key)
    elif store.discard(key):
        store.stats.invalidated(key)


def _resolve_store(session: AsyncSession | None, caller: str) -> LocalStore:
    scope = current_scope.get()
    if session is None:
        if scope is None or scope.store is None:
            raise OutsideScopeError(caller)
        return scope.store
    store = store_of(session)
    if store is not None:
        return store
    if scope is None:
        raise OutsideScopeError(caller)
    cache: SessionCache = scope.cache
    return cache.attach(session)


def _key_or_warn(statement: Executable) -> Hashable | None:
    key = statement_key(statement)
    if key is None:
        warnings.warn(
            "this statement cannot be cached (SQLAlchemy produced no cache key, e.g. a "
            "TypeDecorator without cache_ok=True); it runs uncached",
            UncacheableStatementWarning,
            stacklevel=3,
        )
        return None
    try:
        hash(key)
    except TypeError:
        warnings.warn(
            "this statement cannot be cached: a bound value is not hashable; it runs uncached",
            UncacheableStatementWarning,
            stacklevel=3,
        )
        return None
    return key


async def _flush_pending(store: LocalStore) -> None:
    """Flush first, as ``execute`` would autoflush, so a hit never skips pending changes
    (pitfall 3) and the flush's writes invalidate the entries they make stale (pitfall 4).
    (The caller checks for pending changes first: a hit with none awaits nothing here.)"""
    async with store.lock:
        if has_pending_changes(store.sync_session):
            await store.session.flush()


async def _execute_uncached(store: LocalStore, statement: Executable) -> Result[Any]:
    async with store.lock:
        return await store.session.execute(statement)


async def _fill_once(
    store: LocalStore,
    key: Hashable,
    statement: Executable,
    expiration_time: float | None,
) -> FrozenRows:
    """Run the query for ``key`` once, however many tasks miss it at the same time."""

    counters = store.stats.of(key, statement)

    async def fill() -> FrozenRows:
        async with store.lock:
            started_at = store.write_seq
            began = time.perf_counter()
            result = await store.session.execute(statement)
            rows = FrozenRows(result)
        counters.miss(time.perf_counter() - began)
        if store.put(
            key,
            rows,
            tables_read(statement, key),
            started_at=started_at,
            expiration_time=expiration_time,
        ):
            counters.fill()
        return rows

    rows, ran = await run_once(store.inflight, key, fill)
    if not ran:
        store.stats.coalesced += 1
    return rows
