"""Scopes: one session and one local cache per scope, removed when the scope ends."""

from __future__ import annotations

import asyncio

import pytest
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from sqlalchemy import inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from async_session_cache import (
    AsyncSessionCacheError,
    FromCache,
    SessionCache,
    UnknownRegionError,
    cached_execute,
)
from async_session_cache._cache import closing_needs_io
from tests.models import User
from tests.unit.conftest import SQLLog


def assert_nothing_left(cache: SessionCache) -> None:
    """No session in the scoped registry, no local store or entry alive."""
    assert cache.session.registry.registry == {}
    local = cache.stats()["local"]
    assert (local["sessions"], local["entries"]) == (0, 0)


async def test_scope_yields_the_scoped_session(cache: SessionCache) -> None:
    """Inside a scope, the yielded session is what cache.session gives."""
    async with cache.scope() as session:
        assert isinstance(session, AsyncSession)
        assert cache.session() is session
        assert (await cache.session.execute(select(User.id).where(User.id == 1))).scalar() == 1


async def test_leaving_a_scope_closes_and_removes_everything(cache: SessionCache) -> None:
    """After a scope the session is closed, out of the registry, and its cache is gone."""
    async with cache.scope() as session:
        user = (await cached_execute(select(User).where(User.id == 1))).scalar_one()
        assert cache.stats()["local"]["entries"] == 1
    assert user not in session  # closed: its instances were expunged
    assert_nothing_left(cache)


async def test_leaving_by_exception_also_cleans_up(cache: SessionCache) -> None:
    """A scope left by an exception still closes and removes its session and cache."""
    with pytest.raises(RuntimeError, match="boom"):
        async with cache.scope():
            await cached_execute(select(User.id))
            raise RuntimeError("boom")
    assert_nothing_left(cache)


async def test_scope_checks_the_connection_back_in(
    cache: SessionCache, engine: AsyncEngine
) -> None:
    """The scope's connection returns to the pool when the scope ends."""
    async with cache.scope():
        await cached_execute(select(User.id))
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_scope_outside_any_transaction_still_detaches_its_instances(
    cache: SessionCache, engine: AsyncEngine
) -> None:
    """A scope that ends with no transaction open (committed, or served from the cache
    without I/O) closes its session too: instances detached, registry empty, pool idle."""
    async with cache.scope() as session:
        user = (await cached_execute(select(User).where(User.id == 1))).scalar_one()
        await session.commit()
        assert not session.in_transaction() and user in session
    assert inspect(user).detached
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert_nothing_left(cache)


async def test_a_session_class_overriding_close_is_closed_through_it(engine: AsyncEngine) -> None:
    """A scope ends its session through the session class's own close()."""
    closed: list[AsyncSession] = []

    class ClosingSession(AsyncSession):
        async def close(self) -> None:
            closed.append(self)
            await super().close()

    cache = SessionCache(async_sessionmaker(engine, class_=ClosingSession))
    async with cache.scope() as session:
        pass
    assert closed == [session]
    assert_nothing_left(cache)


async def test_closing_needs_io_only_with_a_transaction_or_an_own_close(
    cache: SessionCache, engine: AsyncEngine
) -> None:
    """A scope's exit awaits (and FastAPI shields it) only when closing may do I/O."""
    async with cache.scope() as session:
        assert not closing_needs_io(session)
        await session.execute(select(User.id))
        assert closing_needs_io(session)
        await session.commit()
        assert not closing_needs_io(session)

    class OwnClose(AsyncSession):
        async def close(self) -> None:
            await super().close()

    assert closing_needs_io(OwnClose(engine))


async def test_nested_scopes_are_separate(cache: SessionCache, sql: SQLLog) -> None:
    """An inner scope has its own session and cache; the outer one resumes after it."""
    statement = select(User).where(User.id == 1)
    async with cache.scope() as outer:
        outer_user = (await cached_execute(statement)).scalar_one()
        async with cache.scope() as inner:
            assert inner is not outer
            assert cache.session() is inner
            queries = len(sql.selects)
            inner_user = (await cached_execute(statement)).scalar_one()
            assert len(sql.selects) == queries + 1
            assert inner_user is not outer_user
            assert inner_user in inner
        assert cache.session() is outer
        queries = len(sql.selects)
        assert (await cached_execute(statement)).scalar_one() is outer_user
        assert len(sql.selects) == queries
    assert_nothing_left(cache)


async def test_scopes_of_two_caches_nest(engine: AsyncEngine) -> None:
    """Each SessionCache finds its own scope even when another cache's scope is inside."""
    first = SessionCache(async_sessionmaker(engine))
    second = SessionCache(async_sessionmaker(engine))
    async with first.scope() as a, second.scope() as b:
        assert first.session() is a
        assert second.session() is b
        assert (await cached_execute(select(User.id).where(User.id == 2))).scalar() == 2


async def test_a_thousand_concurrent_scopes_stay_isolated(cache: SessionCache) -> None:
    """1,000 concurrent scopes each see only their own session and cached rows."""
    barrier = asyncio.Barrier(1000)

    async def request(n: int) -> tuple[int, bool, bool]:
        user_id = n % 10 + 1
        async with cache.scope() as session:
            statement = select(User).where(User.id == user_id)
            user = (await cached_execute(statement)).scalar_one()
            await session.commit()  # give the connection back; instances stay loaded
            await barrier.wait()  # all 1,000 scopes are open at once
            again = (await cached_execute(statement)).scalar_one()
            return user.id, again is user, cache.session() is session and user in session

    results = await asyncio.gather(*(request(n) for n in range(1000)))
    assert [r[0] for r in results] == [n % 10 + 1 for n in range(1000)]
    assert all(same and own for _, same, own in results)
    stats = cache.stats()["local"]
    assert (stats["misses"], stats["hits"]) == (1000, 1000)
    assert_nothing_left(cache)


async def test_local_region_is_a_dogpile_backend_on_the_session(cache: SessionCache) -> None:
    """The "local" dogpile region stores on the scope's session: same object back, gone after."""
    region = cache.regions["local"]
    value = object()
    async with cache.scope():
        region.set("answer", value)
        assert region.get("answer") is value
        async with cache.scope():
            assert region.get("answer") is NO_VALUE
        assert region.get("answer") is value
    async with cache.scope():
        assert region.get("answer") is NO_VALUE


async def test_the_recipe_in_its_async_form(cache: SessionCache, sql: SQLLog) -> None:
    """SQLAlchemy's local_session_caching recipe: a region on our backend, FromCache, identity."""
    regions = {
        "local_session": make_region().configure(
            "async_session_cache.local", arguments={"scoped_session": cache.session}
        )
    }
    recipe_cache = SessionCache(cache.session.session_factory, regions=regions)
    statement = select(User).where(User.name == "u9").options(FromCache("local_session"))
    async with recipe_cache.scope() as session:
        person = (await session.execute(statement)).scalar_one()
        queries = len(sql.selects)
        assert (await session.execute(statement)).scalar_one() is person
        assert len(sql.selects) == queries
    async with recipe_cache.scope() as session:
        again = (await session.execute(statement)).scalar_one()
        assert len(sql.selects) == queries + 1
        assert again is not person


async def test_from_cache_matches_cached_execute(cache: SessionCache, sql: SQLLog) -> None:
    """FromCache("local") returns what cached_execute returns, and its hits emit no SQL."""
    statement = select(User).where(User.id <= 2).order_by(User.id)
    async with cache.scope() as session:
        users = (await cached_execute(statement)).scalars().all()
        via_option = (await session.execute(statement.options(FromCache()))).scalars().all()
        queries = len(sql.selects)
        again = (await session.execute(statement.options(FromCache()))).scalars().all()
        assert len(sql.selects) == queries
    assert via_option == users
    assert again == users


async def test_from_cache_keys_on_execution_parameters(cache: SessionCache) -> None:
    """FromCache keys on the parameters given to execute() (pitfall 2)."""
    from sqlalchemy import bindparam

    statement = select(User.id).where(User.name == bindparam("name")).options(FromCache())
    async with cache.scope() as session:
        first = (await session.execute(statement, {"name": "u1"})).scalars().all()
        second = (await session.execute(statement, {"name": "u2"})).scalars().all()
    assert (first, second) == ([2], [3])


async def test_from_cache_with_unknown_region_is_a_clear_error(cache: SessionCache) -> None:
    """FromCache naming a region the cache lacks raises UnknownRegionError."""
    async with cache.scope() as session:
        with pytest.raises(UnknownRegionError, match="'missing'"):
            await session.execute(select(User).options(FromCache("missing")))


def test_local_is_a_reserved_region_name(cache: SessionCache) -> None:
    """Configuring a shared region called "local" is refused."""
    with pytest.raises(AsyncSessionCacheError, match="reserved"):
        SessionCache(cache.session.session_factory, regions={"local": make_region()})
