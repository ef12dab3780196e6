"""The ORM-option route: ``FromCache(region)`` and ``RelationshipCache(attribute, region)``.

A ``do_orm_execute`` listener on the sync ``Session`` (pitfall 2) serves statements carrying
``FromCache``, and the relationship loads (``selectinload``, lazy loads such as
``awaitable_attrs``) a ``RelationshipCache`` names, from the region, keyed on the final
parameters and execution options of the execution. It runs inside SQLAlchemy's greenlet:
the local region is used synchronously, a shared region through ``await_only`` (its misses
run the statement in a nested greenlet).
"""

from __future__ import annotations

import time
import warnings
from functools import partial
from typing import Any

from sqlalchemy.engine import Result
from sqlalchemy.orm import (
    Mapper,
    ORMExecuteState,
    QueryableAttribute,
    RelationshipProperty,
    UserDefinedOption,
)
from sqlalchemy.util import await_only, greenlet_spawn

from ._exceptions import UncacheableStatementWarning
from ._local import LocalStore
from ._payload import Payload, fetch_payload
from ._results import FrozenRows, autoflush
from ._shapes import shape_of
from ._statements import must_read_live, statement_key, tables_read


class _CacheOption(UserDefinedOption):
    def __init__(self, region: str, expiration_time: float | None) -> None:
        super().__init__((region, expiration_time))
        self.region = region
        self.expiration_time = expiration_time


class FromCache(_CacheOption):
    """Load option: serve this SELECT from cache region ``region``.

    ``session.execute(select(User).options(FromCache("local")))`` behaves as
    ``cached_execute`` does, for sessions of a ``SessionCache``.
    """

    def __init__(self, region: str = "local", expiration_time: float | None = None) -> None:
        super().__init__(region, expiration_time)


class RelationshipCache(_CacheOption):
    """Load option: serve the loads of one relationship from cache region ``region``.

    ``select(User).options(selectinload(User.addresses), RelationshipCache(User.addresses,
    "shared"))`` caches the addresses query the eager load runs; the option travels with
    the loaded instances, so their later lazy loads (``awaitable_attrs``) use it too.
    The same invalidation applies as to any cached SELECT of the related table.
    """

    propagate_to_loaders = True

    def __init__(
        self,
        attribute: QueryableAttribute[Any],
        region: str = "local",
        expiration_time: float | None = None,
    ) -> None:
        super().__init__(region, expiration_time)
        prop = attribute.property
        if not isinstance(prop, RelationshipProperty):
            raise TypeError(f"RelationshipCache needs a relationship attribute, not {attribute}")
        self.relationship: RelationshipProperty[Any] = prop

    def applies_to(self, orm_execute_state: ORMExecuteState) -> bool:
        """Whether this relationship load is the one the option names."""
        path = orm_execute_state.loader_strategy_path
        if path is None or len(path) < 2:
            return False
        parent, prop = path[-2], path[-1]
        return (
            getattr(prop, "key", None) == self.relationship.key
            and isinstance(parent, Mapper)
            and parent.isa(self.relationship.parent)
        )


def serve_from_cache(store: LocalStore, orm_execute_state: ORMExecuteState) -> Result[Any] | None:
    """``do_orm_execute`` hook: a replayed result for ``FromCache`` statements, else None."""
    if not orm_execute_state.is_select:
        return None
    option = _cache_option(orm_execute_state)
    if option is None:
        return None
    shared = store.owner.shared(option.region)  # None: the session's local store
    statement = orm_execute_state.statement
    if must_read_live(statement):
        store.stats.bypasses += 1
        return None
    options = {
        name: value
        for name, value in orm_execute_state.local_execution_options.items()
        if not name.startswith(("_", "sa_"))  # SQLAlchemy's own bookkeeping
    }
    key = statement_key(statement, orm_execute_state.parameters, options)
    if key is None:
        warnings.warn(
            "this statement cannot be cached (no SQLAlchemy cache key); it runs uncached",
            UncacheableStatementWarning,
            stacklevel=2,
        )
        store.stats.bypasses += 1
        return None
    autoflush(orm_execute_state.session)  # before looking anything up (pitfall 3)
    if shared is not None:
        session = orm_execute_state.session
        parameters = orm_execute_state.parameters

        async def fetch() -> Payload:
            shape = shape_of(statement, key, store.dialect)
            return await greenlet_spawn(
                fetch_payload, session, statement, shape, parameters, options
            )

        result: Result[Any] | None = await_only(
            shared.execute(
                store,
                statement,
                key,
                option.expiration_time,
                run=partial(greenlet_spawn, orm_execute_state.invoke_statement),
                fetch=fetch,
            )
        )
        if result is not None:
            return result
    counters = store.stats.of(key, statement)
    rows = store.lookup(key)
    if rows is not None:
        counters.hit()
        return rows.replay()
    started_at = store.write_seq
    began = time.perf_counter()
    rows = FrozenRows(orm_execute_state.invoke_statement())
    counters.miss(time.perf_counter() - began)
    if store.put(
        key,
        rows,
        tables_read(statement, key),
        started_at=started_at,
        expiration_time=option.expiration_time,
    ):
        counters.fill()
    return rows.replay()


def _cache_option(orm_execute_state: ORMExecuteState) -> _CacheOption | None:
    """The FromCache of a top-level SELECT, or the RelationshipCache naming this
    relationship load."""
    relationship_load = orm_execute_state.is_relationship_load
    for option in orm_execute_state.user_defined_options:
        if relationship_load:
            if isinstance(option, RelationshipCache) and option.applies_to(orm_execute_state):
                return option
        elif isinstance(option, FromCache):
            return option
    return None
