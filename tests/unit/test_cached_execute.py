"""cached_execute returns what AsyncSession.execute returns, and serves repeats without SQL."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import (
    Result,
    bindparam,
    func,
    lambda_stmt,
    literal_column,
    select,
    text,
    type_coerce,
)
from sqlalchemy.exc import InvalidRequestError, SAWarning
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload, selectinload

from async_session_cache import (
    AsyncSessionCacheError,
    NotASelectError,
    OutsideScopeError,
    SessionCache,
    UncacheableStatementWarning,
    UnknownRegionError,
    cached_execute,
    invalidate,
)
from tests.models import Address, NoCacheKeyString, Tag, User
from tests.unit.conftest import SQLLog

users = User.__table__

STATEMENTS = {
    "orm entity by key": lambda: select(User).where(User.id == 3),
    "orm entities ordered": lambda: select(User).where(User.age >= 22).order_by(User.id),
    "multi entity join": lambda: (
        select(User, Address).join(User.addresses).where(User.id <= 3).order_by(Address.id)
    ),
    "entity and column": lambda: (
        select(User, Address.email).join(User.addresses).order_by(Address.id)
    ),
    "orm columns": lambda: select(User.id, User.name).where(User.age < 25).order_by(User.id),
    "core table": lambda: select(users).where(users.c.id.in_([1, 2, 5])).order_by(users.c.id),
    "aggregate": lambda: (
        select((User.age % 3).label("bucket"), func.count())
        .group_by(literal_column("bucket"))
        .order_by(literal_column("bucket"))
    ),
    "empty": lambda: select(User).where(User.id < 0),
}

CONSUMERS: dict[str, Callable[[Result[Any]], Any]] = {
    "all": lambda r: r.all(),
    "scalars": lambda r: r.scalars().all(),
    "mappings": lambda r: [dict(m) for m in r.mappings().all()],
    "first": lambda r: r.first(),
    "iterate": lambda r: list(r),
    "fetchmany": lambda r: r.fetchmany(2),
    "columns": lambda r: r.columns(0).all(),
    "unique": lambda r: r.unique().all(),
}


def _normal(value: Any) -> Any:
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if hasattr(value, "_sa_instance_state"):
        return (type(value).__name__, value.id)
    if isinstance(value, tuple):
        return tuple(_normal(v) for v in value)
    if value is not None and hasattr(value, "_tuple"):
        return _normal(tuple(value))
    return value


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
@pytest.mark.parametrize("name", sorted(STATEMENTS))
async def test_miss_and_hit_match_uncached_execute(
    cache: SessionCache, sql: SQLLog, name: str, consumer: str
) -> None:
    """Every way of reading a result gives on a miss and on a hit what execute() gives."""
    build, consume = STATEMENTS[name], CONSUMERS[consumer]
    async with cache.scope() as session:
        expected = _normal(consume(await session.execute(build())))
        missed = _normal(consume(await cached_execute(build())))
        before = sql.count()
        hit = _normal(consume(await cached_execute(build())))
        assert sql.count() == before, "a hit must not reach the database"
    assert missed == expected
    assert hit == expected


async def test_scalar_one_and_scalar_on_hit(cache: SessionCache, sql: SQLLog) -> None:
    """scalar_one(), scalar() and one() behave on a hit as on a fresh execute."""
    async with cache.scope():
        first = (await cached_execute(select(User).where(User.id == 4))).scalar_one()
        before = sql.count()
        again = await cached_execute(select(User).where(User.id == 4))
        assert again.scalar_one() is first
        assert (await cached_execute(select(User).where(User.id == 4))).scalar() is first
        assert (await cached_execute(select(User).where(User.id == 4))).one()[0] is first
        assert sql.count() == before
        empty = await cached_execute(select(User).where(User.id == 999))
        assert empty.scalar_one_or_none() is None


async def test_hit_returns_the_sessions_own_instances(cache: SessionCache) -> None:
    """ORM entities on a hit are the identity-map instances, attached to the session."""
    async with cache.scope() as session:
        loaded = await session.get(User, 2)
        first = (await cached_execute(select(User).where(User.id == 2))).scalar_one()
        second = (await cached_execute(select(User).where(User.id == 2))).scalar_one()
        assert first is loaded
        assert second is loaded
        assert second in session


async def test_rows_are_values_not_references(cache: SessionCache) -> None:
    """Mutating a list returned by a hit does not change what the next hit returns."""
    async with cache.scope():
        rows = (await cached_execute(select(User.id).order_by(User.id))).all()
        rows.clear()
        again = (await cached_execute(select(User.id).order_by(User.id))).all()
    assert [r.id for r in again] == list(range(1, 11))


async def test_keys_cover_bound_values_and_limits(cache: SessionCache, sql: SQLLog) -> None:
    """Different bound values, IN-lists, limits and offsets are different entries."""
    async with cache.scope():
        variants: list[Callable[[], Any]] = [
            lambda: select(User.id).where(User.id.in_([1, 2])),
            lambda: select(User.id).where(User.id.in_([1, 2, 3])),
            lambda: select(User.id).order_by(User.id).limit(2),
            lambda: select(User.id).order_by(User.id).limit(3),
            lambda: select(User.id).order_by(User.id).limit(2).offset(2),
            lambda: select(User.id).where(User.name == "u1"),
            lambda: select(User.id).where(User.name == "u2"),
        ]
        results = [(await cached_execute(build())).scalars().all() for build in variants]
        queries = len(sql.selects)
        again = [(await cached_execute(build())).scalars().all() for build in variants]
    assert queries == len(variants)
    assert results == again
    assert results == [[1, 2], [1, 2, 3], [1, 2], [1, 2, 3], [3, 4], [2], [3]]


async def test_statement_params_are_part_of_the_key(cache: SessionCache) -> None:
    """Values given by ``.params()`` (kept beside the binds since SQLAlchemy 2.1) key too."""
    template = select(User.name).where(User.id == bindparam("uid"))
    async with cache.scope() as session:
        cached = [(await cached_execute(template.params(uid=uid))).scalar() for uid in (1, 2, 3)]
        again = [(await cached_execute(template.params(uid=uid))).scalar() for uid in (1, 2, 3)]
        plain = [(await session.execute(template.params(uid=uid))).scalar() for uid in (1, 2, 3)]
    assert cached == again == plain == ["u0", "u1", "u2"]


async def test_loader_options_are_part_of_the_key(cache: SessionCache) -> None:
    """An eager-load query is not served the lazy result of the same SELECT (pitfall 5)."""
    async with cache.scope() as session:
        lazy = (await cached_execute(select(User).where(User.id == 1))).scalar_one()
        session.expire(lazy, ["addresses"])
        eager = await cached_execute(
            select(User).options(selectinload(User.addresses)).where(User.id == 1)
        )
        user = eager.scalar_one()
        assert [a.email for a in user.addresses] == ["u0-0@example.com", "u0-1@example.com"]


async def test_execution_options_are_part_of_the_key(cache: SessionCache, sql: SQLLog) -> None:
    """A statement with different execution options is a separate entry."""
    async with cache.scope():
        await cached_execute(select(User.id))
        queries = len(sql.selects)
        await cached_execute(select(User.id).execution_options(my_option=1))
        assert len(sql.selects) == queries + 1
        await cached_execute(select(User.id).execution_options(my_option=1))
        assert len(sql.selects) == queries + 1


async def test_joined_eager_collections_still_require_unique(cache: SessionCache) -> None:
    """A joined eager load of a collection demands unique() on a hit, as execute() does."""
    statement = select(User).options(joinedload(User.addresses)).order_by(User.id)
    async with cache.scope():
        with pytest.raises(InvalidRequestError, match="unique"):
            (await cached_execute(statement)).scalars().all()
        users_ = (await cached_execute(statement)).unique().scalars().all()
        again = (await cached_execute(statement)).unique().scalars().all()
        with pytest.raises(InvalidRequestError, match="unique"):
            (await cached_execute(statement)).all()
    assert [u.id for u in users_] == list(range(1, 11))
    assert again == users_


async def test_expiration_time_bounds_an_entry(cache: SessionCache, sql: SQLLog) -> None:
    """An entry is not served once its expiration_time has passed."""
    async with cache.scope():
        await cached_execute(select(User.id), expiration_time=0.05)
        await cached_execute(select(User.id), expiration_time=0.05)
        assert len(sql.selects) == 1
        await asyncio.sleep(0.06)
        await cached_execute(select(User.id), expiration_time=0.05)
        assert len(sql.selects) == 2
        with pytest.raises(ValueError, match="expiration_time"):
            await cached_execute(select(User.id), expiration_time=0)


async def test_invalidate_drops_one_entry(cache: SessionCache, sql: SQLLog) -> None:
    """invalidate(stmt) makes the next read of that statement, and only it, a miss."""
    async with cache.scope():
        await cached_execute(select(User.id).where(User.id == 1))
        await cached_execute(select(User.id).where(User.id == 2))
        await invalidate(select(User.id).where(User.id == 1))
        queries = len(sql.selects)
        await cached_execute(select(User.id).where(User.id == 1))
        await cached_execute(select(User.id).where(User.id == 2))
        assert len(sql.selects) == queries + 1
    assert cache.stats()["local"]["invalidations"] == 1


async def test_stats_count_hits_misses_fills(cache: SessionCache) -> None:
    """stats() reports hits, misses and fills of the local region."""
    async with cache.scope():
        for _ in range(3):
            await cached_execute(select(User.id))
        await cached_execute(select(Tag.id))
        stats = cache.stats()["local"]
        assert (stats["hits"], stats["misses"], stats["fills"]) == (2, 2, 2)
        assert stats["entries"] == 2
        assert stats["sessions"] == 1


async def test_outside_a_scope_is_a_clear_error() -> None:
    """Calls outside any scope raise OutsideScopeError naming scope()."""
    with pytest.raises(OutsideScopeError, match=r"scope\(\)"):
        await cached_execute(select(User))
    with pytest.raises(OutsideScopeError, match=r"scope\(\)"):
        await invalidate(select(User))


async def test_outside_a_scope_the_scoped_session_is_a_clear_error(cache: SessionCache) -> None:
    """Using cache.session outside a scope raises OutsideScopeError naming scope()."""
    with pytest.raises(OutsideScopeError, match=r"scope\(\)"):
        cache.session()


async def test_explicit_session_works_outside_a_scope(cache: SessionCache, sql: SQLLog) -> None:
    """session= serves a session that was attached to the cache, even outside its scope."""
    async with cache.scope() as session:
        pass
    factory_session: AsyncSession = cache.session.session_factory()
    async with factory_session:
        with pytest.raises(OutsideScopeError):
            await cached_execute(select(User.id), session=factory_session)
        async with cache.scope():
            await cached_execute(select(User.id), session=factory_session)
        queries = len(sql.selects)
        rows = (await cached_execute(select(User.id), session=factory_session)).all()
        assert len(sql.selects) == queries
        assert len(rows) == 10
    assert session is not factory_session


@pytest.mark.parametrize(
    "statement",
    [
        lambda: User.__table__.update().values(age=1),
        lambda: User.__table__.insert().values(id=99, name="x", age=1),
        lambda: text("SELECT 1"),
        lambda: User.__table__.delete(),
    ],
    ids=["update", "insert", "text", "delete"],
)
async def test_non_select_is_a_clear_error(
    cache: SessionCache, statement: Callable[[], Any]
) -> None:
    """Only SELECTs are cached; anything else raises NotASelectError."""
    async with cache.scope():
        with pytest.raises(NotASelectError, match="only SELECT"):
            await cached_execute(statement())


async def test_textual_select_is_cached(cache: SessionCache, sql: SQLLog) -> None:
    """text().columns() is a SELECT and is cached like one."""
    statement = text("SELECT id FROM users ORDER BY id").columns(literal_column("id"))
    async with cache.scope():
        first = (await cached_execute(statement)).scalars().all()
        queries = len(sql.selects)
        assert (await cached_execute(statement)).scalars().all() == first
        assert len(sql.selects) == queries


async def test_lambda_statements_are_cached(cache: SessionCache, sql: SQLLog) -> None:
    """A lambda_stmt SELECT is keyed on its closure values and cached like a select()."""

    def by_id(user_id: int) -> Any:
        return lambda_stmt(lambda: select(User).where(User.id == user_id))

    async with cache.scope():
        three = (await cached_execute(by_id(3))).scalar_one()
        four = (await cached_execute(by_id(4))).scalar_one()
        queries = len(sql.selects)
        assert (await cached_execute(by_id(3))).scalar_one() is three
        assert len(sql.selects) == queries
    assert (three.id, four.id) == (3, 4)


async def test_unknown_region_lists_the_configured_ones(cache: SessionCache) -> None:
    """A wrong region name raises UnknownRegionError naming the configured regions."""
    async with cache.scope():
        with pytest.raises(UnknownRegionError, match=r"'nope'.*local"):
            await cached_execute(select(User), region="nope")
        with pytest.raises(UnknownRegionError):
            await invalidate(select(User), region="nope")


async def test_uncacheable_statement_runs_with_a_warning(cache: SessionCache, sql: SQLLog) -> None:
    """A statement SQLAlchemy cannot key runs uncached, with a warning (pitfall 6)."""
    statement = select(User.id).where(type_coerce(User.name, NoCacheKeyString()) == "u1")
    async with cache.scope():
        for _ in range(2):
            with pytest.warns(UncacheableStatementWarning), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "TypeDecorator", SAWarning)  # SQLAlchemy's own
                rows = (await cached_execute(statement)).scalars().all()
            assert rows == [2]
        assert len(sql.selects) == 2
    assert cache.stats()["local"]["bypasses"] == 2


async def test_live_reads_bypass_the_cache(cache: SessionCache, sql: SQLLog) -> None:
    """populate_existing and FOR UPDATE ask for the database, so they always query it."""
    async with cache.scope():
        for statement in (
            select(User).where(User.id == 1).execution_options(populate_existing=True),
            select(User).where(User.id == 1).with_for_update(),
        ):
            await cached_execute(statement)
            queries = len(sql.selects)
            await cached_execute(statement)
            assert len(sql.selects) == queries + 1


def test_exceptions_share_one_root() -> None:
    """Every library error is an AsyncSessionCacheError."""
    for error in (OutsideScopeError, UnknownRegionError, NotASelectError):
        assert issubclass(error, AsyncSessionCacheError)


async def test_failed_query_is_not_cached(cache: SessionCache) -> None:
    """A query that fails raises on every call and leaves nothing cached."""
    statement = select(literal_column("no_such_column")).select_from(User)
    async with cache.scope() as session:
        for _ in range(2):
            with pytest.raises(Exception, match="no_such_column"):
                await cached_execute(statement)
            await session.rollback()
    assert cache.stats()["local"]["fills"] == 0
