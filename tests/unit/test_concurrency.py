"""Sibling tasks of one scope share its session safely (pitfall 7); misses are single-flight."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import event, literal_column, select
from sqlalchemy.ext.asyncio import AsyncEngine

from async_session_cache import SessionCache, cached_execute
from tests.models import User
from tests.unit.conftest import SQLLog


async def test_sibling_tasks_share_the_session_safely(cache: SessionCache) -> None:
    """gather() of many different cached reads in one fresh scope all succeed."""
    async with cache.scope():
        results = await asyncio.gather(
            *(cached_execute(select(User.name).where(User.id == n % 10 + 1)) for n in range(50))
        )
    assert [r.scalar_one() for r in results] == [f"u{n % 10}" for n in range(50)]


async def test_concurrent_misses_of_one_key_run_one_query(cache: SessionCache, sql: SQLLog) -> None:
    """100 concurrent misses of the same statement in a scope emit a single SELECT."""
    async with cache.scope():
        results = await asyncio.gather(
            *(cached_execute(select(User).where(User.age > 25)) for _ in range(100))
        )
    assert len(sql.selects) == 1
    first = results[0].scalars().all()
    assert all(r.scalars().all() == first for r in results[1:])
    stats = cache.stats()["local"]
    assert (stats["misses"], stats["coalesced"]) == (1, 99)


async def test_a_failed_fill_reaches_every_waiter(cache: SessionCache, sql: SQLLog) -> None:
    """When the shared query fails, every waiter gets the error and nothing is cached."""
    statement = select(literal_column("missing_column")).select_from(User)
    async with cache.scope() as session:
        results = await asyncio.gather(
            *(cached_execute(statement) for _ in range(5)), return_exceptions=True
        )
        await session.rollback()
    assert all(isinstance(r, Exception) and "missing_column" in str(r) for r in results)
    assert len(sql.selects) == 1
    assert cache.stats()["local"]["fills"] == 0


async def test_waiters_take_over_when_the_filler_is_cancelled(
    cache: SessionCache, engine: AsyncEngine, sql: SQLLog
) -> None:
    """Cancelling the task that fills a key does not cancel the tasks waiting for it."""
    started = asyncio.Event()
    release = asyncio.Event()
    gate_used = False

    async def slow_connect(*_: Any) -> None:
        nonlocal gate_used
        if not gate_used:
            gate_used = True
            started.set()
            await release.wait()

    statement = select(User.id).where(User.id == 7)
    async with cache.scope() as session:
        # Hold the first execution inside the session lock so the others queue behind it.
        original_execute = session.execute

        async def gated_execute(*args: Any, **kwargs: Any) -> Any:
            await slow_connect()
            return await original_execute(*args, **kwargs)

        session.execute = gated_execute  # type: ignore[method-assign]
        filler = asyncio.create_task(cached_execute(statement))
        await started.wait()
        waiters = [asyncio.create_task(cached_execute(statement)) for _ in range(3)]
        await asyncio.sleep(0)
        filler.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await filler
        results = await asyncio.gather(*waiters)
    assert [r.scalar_one() for r in results] == [7, 7, 7]
    assert len(sql.selects) == 1


async def test_hits_do_not_wait_for_a_running_miss(cache: SessionCache) -> None:
    """A hit is served while another key's miss is holding the session."""
    statement = select(User.id).where(User.id == 1)
    async with cache.scope() as session:
        await cached_execute(statement)
        entered = asyncio.Event()
        release = asyncio.Event()

        def block(*_: Any) -> None:
            entered.set()

        event.listen(session.sync_session, "do_orm_execute", block)
        original_execute = session.execute

        async def held_execute(*args: Any, **kwargs: Any) -> Any:
            result = await original_execute(*args, **kwargs)
            await release.wait()
            return result

        session.execute = held_execute  # type: ignore[method-assign]
        miss = asyncio.create_task(cached_execute(select(User.id).where(User.id == 2)))
        await entered.wait()
        hit = await asyncio.wait_for(cached_execute(statement), timeout=5)
        assert hit.scalar_one() == 1
        assert not miss.done()
        release.set()
        assert (await miss).scalar_one() == 2
