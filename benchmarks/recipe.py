"""SQLAlchemy's ``examples/dogpile_caching`` recipe, ported to ``AsyncSession`` as a user would.

This is ``caching_query.py`` (``ORMCache``, ``FromCache``) with the smallest change that makes it
run under ``AsyncSession``: ``AsyncSession`` has no ``do_orm_execute`` event of its own, so the
listener goes on the synchronous ``Session`` class that ``async_sessionmaker`` wraps
(``sync_session_class=``, DESIGN.md pitfall 2). Everything else is the recipe's logic:

- the key is the statement's SQL compilation cache key rendered by ``to_offline_string`` (the
  SQL text plus the bound values) followed by ``repr(cache_key)``; regions are separate
  stores, so the region name is not part of it;
- a miss runs ``region.get_or_create(key, createfunc)`` where ``createfunc`` calls
  ``orm_context.invoke_statement().freeze()``;
- a hit returns ``merge_frozen_result(session, statement, frozen, load=False)()``.

The benchmark keeps the recipe's limits on purpose; they are what this project replaces:

- ``createfunc`` runs the query inside SQLAlchemy's greenlet while dogpile holds a
  ``threading.Lock`` for the key. With one caller that is fine. A second task missing the same
  key while the first is suspended in the driver blocks the event loop's thread on that lock,
  and the first task can never resume (DESIGN.md pitfall 1);
- ``dogpile.cache.redis`` is a blocking client: every get and set holds the event loop for a
  network round trip, and values are pickled ``FrozenResult`` objects (ORM instances included);
- the key ignores loader options (pitfall 5) and nothing invalidates on writes.

``RelationshipCache`` and the ``ignore_expiration`` path of the recipe are kept for
completeness; the benchmark uses ``FromCache`` only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from dogpile.cache import CacheRegion, make_region
from dogpile.cache.api import NO_VALUE
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import ORMExecuteState, Session, loading
from sqlalchemy.orm.interfaces import UserDefinedOption


class ORMCache:
    """Serves ``FromCache`` statements from dogpile regions through ``do_orm_execute``."""

    def __init__(self, regions: Mapping[str, CacheRegion]) -> None:
        self.cache_regions = regions
        self._statement_cache: dict[Any, str] = {}

    def listen_on_session(self, session_factory: Any) -> None:
        """Listen on a *sync* ``Session`` class or ``sessionmaker`` (not on ``AsyncSession``)."""
        event.listen(session_factory, "do_orm_execute", self._do_orm_execute)

    def _do_orm_execute(self, orm_context: ORMExecuteState) -> Any:
        for opt in orm_context.user_defined_options:
            if isinstance(opt, RelationshipCache):
                opt = opt._process_orm_context(orm_context)
                if opt is None:
                    continue

            if isinstance(opt, FromCache):
                dogpile_region = self.cache_regions[opt.region]

                our_cache_key = opt._generate_cache_key(
                    orm_context.statement, orm_context.parameters or {}, self
                )

                if opt.ignore_expiration:
                    cached_value = dogpile_region.get(
                        our_cache_key,
                        expiration_time=opt.expiration_time,
                        ignore_expiration=opt.ignore_expiration,
                    )
                else:

                    def createfunc() -> Any:
                        return orm_context.invoke_statement().freeze()

                    cached_value = dogpile_region.get_or_create(
                        our_cache_key,
                        createfunc,
                        expiration_time=opt.expiration_time,
                    )

                if cached_value is NO_VALUE:
                    # keyerror?   this is bigger than a keyerror...
                    raise KeyError()

                orm_result = loading.merge_frozen_result(
                    orm_context.session,
                    orm_context.statement,
                    cached_value,
                    load=False,
                )
                return orm_result()

        return None

    def invalidate(self, statement: Any, parameters: Any, opt: FromCache) -> None:
        """Invalidate the cache value represented by a statement."""
        statement = statement.__clause_element__()
        dogpile_region = self.cache_regions[opt.region]
        cache_key = opt._generate_cache_key(statement, parameters, self)
        dogpile_region.delete(cache_key)


class FromCache(UserDefinedOption):
    """Specifies that a statement should load results from a cache."""

    propagate_to_loaders = False

    def __init__(
        self,
        region: str = "default",
        cache_key: Any = None,
        expiration_time: float | None = None,
        ignore_expiration: bool = False,
    ) -> None:
        self.region = region
        self.cache_key = cache_key
        self.expiration_time = expiration_time
        self.ignore_expiration = ignore_expiration

    def _generate_cache_key(
        self, statement: Any, parameters: Mapping[str, Any], orm_cache: ORMCache
    ) -> str:
        """The SQL compilation cache key repurposed as a results key (offline string form)."""
        statement_cache_key = statement._generate_cache_key()
        key: str = statement_cache_key.to_offline_string(
            orm_cache._statement_cache, statement, parameters
        ) + repr(self.cache_key)
        return key


class RelationshipCache(FromCache):
    """Specifies that a lazy load of one relationship should load results from a cache."""

    propagate_to_loaders = True

    def __init__(
        self,
        attribute: Any,
        region: str = "default",
        cache_key: Any = None,
        expiration_time: float | None = None,
        ignore_expiration: bool = False,
    ) -> None:
        super().__init__(region, cache_key, expiration_time, ignore_expiration)
        self._relationship_options = {
            (attribute.property.parent.class_, attribute.property.key): self
        }

    def _process_orm_context(self, orm_context: ORMExecuteState) -> FromCache | None:
        current_path = orm_context.loader_strategy_path
        if current_path:
            mapper, prop = current_path[-2:]
            key = prop.key
            for cls in mapper.class_.__mro__:
                if (cls, key) in self._relationship_options:
                    return self._relationship_options[(cls, key)]
        return None

    def and_(self, option: RelationshipCache) -> RelationshipCache:
        """Chain another RelationshipCache option to this one."""
        self._relationship_options.update(option._relationship_options)
        return self


# -- environment.py, the async port ------------------------------------------------------------


def md5_key_mangler(key: str) -> str:
    """The recipe's key mangler: long offline strings become md5 digests (persistent stores)."""
    return hashlib.md5(key.encode("utf-8"), usedforsecurity=False).hexdigest()


def memory_region() -> CacheRegion:
    """A ``dogpile.cache.memory`` region: values (``FrozenResult`` objects) kept as they are."""
    return make_region().configure("dogpile.cache.memory")


def redis_region(host: str, port: int, db: int = 0) -> CacheRegion:
    """A ``dogpile.cache.redis`` region (blocking client, pickled values, md5-mangled keys)."""
    return make_region(key_mangler=md5_key_mangler).configure(
        "dogpile.cache.redis",
        arguments={"host": host, "port": port, "db": db, "redis_expiration_time": 3600},
    )


def caching_sessionmaker(
    engine: AsyncEngine, orm_cache: ORMCache
) -> async_sessionmaker[AsyncSession]:
    """An ``async_sessionmaker`` whose sync sessions run ``orm_cache``'s listener."""

    class CachingSession(Session):
        """The sync session class the AsyncSessions wrap; it carries the listener."""

    orm_cache.listen_on_session(CachingSession)
    return async_sessionmaker(engine, sync_session_class=CachingSession, expire_on_commit=False)
