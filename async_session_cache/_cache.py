"""``SessionCache``: scoping of sessions by a ``ContextVar``, and the configured regions.

A scope is an object stored in a module-level ``ContextVar``; the ``async_scoped_session``
uses the innermost scope of its own cache as the registry key. Tasks created inside a scope
inherit it (they share one session: pitfall 7, handled by the store's lock), while separate
requests, each entering ``scope()``, never see each other's session or cache.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from dogpile.cache import CacheRegion, make_region
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker
from sqlalchemy.util import await_only

from ._events import LISTENERS, tracking_session_class
from ._exceptions import AsyncSessionCacheError, OutsideScopeError, UnknownRegionError
from ._local import BACKEND_NAME, LocalStore, ScopedSessionBackend, store_of
from ._shared import SharedRegion
from ._stats import RegionStats
from ._verify import ShadowVerifier

LOCAL: Final = "local"
"""Name of the per-session region every SessionCache has."""


@dataclass(eq=False, slots=True)
class Scope:
    """One ``async with cache.scope()`` block: its cache, its enclosing scope, its store."""

    cache: SessionCache
    parent: Scope | None
    store: LocalStore | None = None


current_scope: ContextVar[Scope | None] = ContextVar("async_session_cache.scope", default=None)


def closing_needs_io(session: AsyncSession) -> bool:
    """Whether closing ``session`` may await: it holds a transaction (so a connection), or
    its class overrides ``close()``. Otherwise a scope's exit never suspends: a request
    served from the cache closes in a few microseconds and cannot be cancelled midway."""
    return type(session).close is not AsyncSession.close or session.sync_session.in_transaction()


class SessionCache:
    """Scoped ``AsyncSession``s, each with its own local query cache, plus shared regions.

    ``session_factory`` is an ``async_sessionmaker``; ``regions`` maps names to configured
    dogpile.cache ``CacheRegion``s (``async_session_cache.memory``, ``dogpile.cache.memory``
    or ``async_session_cache.redis``). The name ``"local"`` is reserved for the per-session
    region, whose values live on the scope's session and end with it.

    ``timeout`` bounds every call to a network store (seconds; a mapping sets it per
    region); ``lock_timeout`` bounds how long a cross-process fill lock is held and waited
    for; after a store failure the region reads from the database for ``retry_interval``.
    """

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        *,
        regions: Mapping[str, CacheRegion] | None = None,
        timeout: float | Mapping[str, float] = 0.25,
        lock_timeout: float = 5.0,
        retry_interval: float = 1.0,
        shadow_verify: float = 0.0,
    ) -> None:
        shared = dict(regions or {})
        if LOCAL in shared:
            raise AsyncSessionCacheError(f"the region name {LOCAL!r} is reserved")
        for name, region in shared.items():
            if not isinstance(region, CacheRegion):
                raise TypeError(f"region {name!r} must be a dogpile.cache CacheRegion")
        kw = dict(session_factory.kw)
        base = kw.pop("sync_session_class", None) or session_factory.class_.sync_session_class
        self._session_class = tracking_session_class(self, base)
        tracked_factory = async_sessionmaker(
            class_=session_factory.class_, sync_session_class=self._session_class, **kw
        )
        self.session: async_scoped_session[AsyncSession] = async_scoped_session(
            tracked_factory, scopefunc=self._scope_key
        )
        """The ``async_scoped_session``; inside a scope it is that scope's session. Its
        ``session_factory`` makes sessions whose writes the cache sees, in a scope or not."""
        local = make_region(name=LOCAL).configure(
            BACKEND_NAME, arguments={"scoped_session": self.session}
        )
        self.regions: Mapping[str, CacheRegion] = MappingProxyType({LOCAL: local, **shared})
        """Every region by name, ``"local"`` included."""
        self._stats = {name: RegionStats() for name in self.regions}
        self._stores: weakref.WeakSet[LocalStore] = weakref.WeakSet()
        self.verifier = ShadowVerifier(shadow_verify, session_factory) if shadow_verify else None
        """Re-reads a sampled fraction of hits uncached (``shadow_verify``), or None."""
        self._shared = {
            name: SharedRegion(
                name,
                region,
                self._stats[name],
                timeout=timeout if isinstance(timeout, int | float) else timeout.get(name, 0.25),
                lock_timeout=lock_timeout,
                retry_interval=retry_interval,
                verifier=self.verifier,
            )
            for name, region in shared.items()
            if not (
                region.is_configured and isinstance(region.actual_backend, ScopedSessionBackend)
            )
        }

    def _scope_key(self) -> Scope:
        scope = current_scope.get()
        while scope is not None:
            if scope.cache is self:
                return scope
            scope = scope.parent
        raise OutsideScopeError("SessionCache.session")

    @asynccontextmanager
    async def scope(self) -> AsyncIterator[AsyncSession]:
        """Open a fresh scope and yield its ``AsyncSession``.

        On exit, normal or by exception, the session is closed and removed from the
        registry, and its local cache is dropped. Scopes nest: an inner scope has its own
        session, and the outer one is current again after it.
        """
        scope = Scope(self, current_scope.get())
        token = current_scope.set(scope)
        try:
            session = self.session()
            scope.store = self.attach(session)
            yield session
        finally:
            try:
                await self._remove()
            finally:
                if scope.store is not None:
                    scope.store.close()
                    self._stores.discard(scope.store)
                current_scope.reset(token)

    async def _remove(self) -> None:
        """``self.session.remove()``, closing the session without a greenlet hop when that
        cannot do I/O (``closing_needs_io``)."""
        registry = self.session.registry
        try:
            if registry.has():
                session = registry()
                if closing_needs_io(session):
                    await session.close()
                else:
                    session.sync_session.close()
        finally:
            registry.clear()

    def attach(self, session: AsyncSession) -> LocalStore:
        """The local store of ``session``, created on first use. Sessions made by
        ``cache.session.session_factory`` attach themselves; attach any other session whose
        writes the cache must see."""
        store = store_of(session)
        if store is None:
            store = LocalStore(session, self, self._stats[LOCAL])
            if not isinstance(session.sync_session, self._session_class):
                for name, listener in LISTENERS:  # not our class: listen to this instance
                    store.listen(name, listener)
            if self._shared:
                store.on_commit = self._invalidate_shared
            self._stores.add(store)
        return store

    def _invalidate_shared(self, tables: frozenset[str]) -> None:
        """Inside ``commit()`` (SQLAlchemy's greenlet): invalidate ``tables`` in every
        shared region before the commit returns to the caller."""
        for shared in self._shared.values():
            await_only(shared.bump(tables))

    def shared(self, name: str) -> SharedRegion | None:
        """The policy of shared region ``name``; None for the local region (and any region
        configured on the session-local backend, as in SQLAlchemy's recipe)."""
        if name not in self.regions:
            raise UnknownRegionError(name, self.regions)
        return self._shared.get(name)  # None: a region on the session-local backend

    async def aclose(self) -> None:
        """Close network clients of the shared regions bound to the running event loop."""
        for shared in self._shared.values():
            close = getattr(getattr(shared.store, "backend", None), "aclose", None)
            if close is not None:
                await close()

    def region(self, name: str) -> CacheRegion:
        """The region called ``name``; ``UnknownRegionError`` lists the configured ones."""
        try:
            return self.regions[name]
        except KeyError:
            raise UnknownRegionError(name, self.regions) from None

    def region_stats(self, name: str) -> RegionStats:
        """The live counters of region ``name``."""
        self.region(name)
        return self._stats[name]

    def statement_stats(self) -> dict[str, list[dict[str, Any]]]:
        """Per region, the counters of each statement shape read through it: ``statement``
        (its SQL, shortened), hits, misses, fills, invalidations (entries dropped, or found
        stale in a shared region), bytes, and ``mean_fill_ms`` of the queries run to fill."""
        return {
            name: [
                {"statement": counters.label, **counters.snapshot()}
                for counters in stats.statements.values()
            ]
            for name, stats in self._stats.items()
        }

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per region: hits, misses, coalesced, fills, invalidations, bypasses.

        The local region also reports ``sessions`` (open stores) and ``entries`` (entries
        held by them now).
        """
        report = {name: stats.snapshot() for name, stats in self._stats.items()}
        for name, shared in self._shared.items():
            report[name]["evictions"] = getattr(
                getattr(shared.store, "backend", None), "evictions", 0
            )
        stores = list(self._stores)
        report[LOCAL]["sessions"] = len(stores)
        report[LOCAL]["entries"] = sum(len(store.entries) for store in stores)
        return report
