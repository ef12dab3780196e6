"""Statistics per region and per statement shape."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from async_session_cache import SessionCache, cached_execute
from tests.models import Tag, User


async def test_statement_stats_count_per_shape(cache: SessionCache) -> None:
    """Each statement shape has its own hits, misses, fills and a readable label."""
    async with cache.scope() as session:
        for user_id in (1, 1, 2, 1):
            await cached_execute(select(User.name).where(User.id == user_id))
        await cached_execute(select(Tag.label))
        await session.execute(update(User).where(User.id == 1).values(age=1))
    shapes = {s["statement"]: s for s in cache.statement_stats()["local"]}
    by_id = next(s for label, s in shapes.items() if "users.id" in label)
    tags = next(s for label, s in shapes.items() if "FROM tags" in label)
    assert (by_id["hits"], by_id["misses"], by_id["fills"]) == (2, 2, 2)
    assert by_id["invalidations"] == 2  # the update dropped both users entries
    assert by_id["mean_fill_ms"] > 0
    assert (tags["hits"], tags["misses"], tags["invalidations"]) == (0, 1, 0)
    region = cache.stats()["local"]
    assert region["hits"] == sum(s["hits"] for s in shapes.values())
    assert region["misses"] == sum(s["misses"] for s in shapes.values())


async def test_shared_statement_stats_count_bytes_and_stale_entries(
    shared_cache: SessionCache,
) -> None:
    """A shared region's shapes report bytes stored and entries found stale after a commit."""
    statement = select(User).where(User.age > 27)
    async with shared_cache.scope():
        await cached_execute(statement, region="shared")
    async with shared_cache.scope() as writer:
        await writer.execute(update(User).where(User.id == 10).values(name="x"))
        await writer.commit()
    async with shared_cache.scope():
        await cached_execute(statement, region="shared")
        await cached_execute(statement, region="shared")
    (shape,) = shared_cache.statement_stats()["shared"]
    assert (shape["hits"], shape["misses"], shape["fills"]) == (1, 2, 2)
    assert shape["invalidations"] == 1
    assert shape["bytes"] > 0
    assert shared_cache.stats()["shared"]["bytes"] == shape["bytes"]


async def test_shadow_verify_counts_hits_checked_against_the_database(engine: AsyncEngine) -> None:
    """With shadow_verify=1 every hit is re-read uncached; agreeing hits are no mismatches."""
    cache = SessionCache(async_sessionmaker(engine, expire_on_commit=False), shadow_verify=1.0)
    async with cache.scope():
        for _ in range(3):
            await cached_execute(select(User).where(User.age > 25))
            await cached_execute(select(User.id, User.name).where(User.id < 4))
    stats = cache.stats()["local"]
    assert (stats["verified"], stats["mismatches"]) == (4, 0)


async def test_shadow_verify_finds_a_stale_hit(engine: AsyncEngine, caplog: Any) -> None:
    """A write the cache cannot see (another engine's connection) shows up as a mismatch."""
    cache = SessionCache(async_sessionmaker(engine, expire_on_commit=False), shadow_verify=1.0)
    statement = select(User.name).where(User.id == 6)
    async with cache.scope():
        await cached_execute(statement)
        async with engine.begin() as connection:  # behind the cache's back
            await connection.execute(update(User).where(User.id == 6).values(name="behind"))
        stale = (await cached_execute(statement)).scalar_one()
    assert stale == "u5"  # the local region cannot know; shadow verification does
    stats = cache.stats()["local"]
    assert (stats["verified"], stats["mismatches"]) == (1, 1)
    assert "differs from the database" in caplog.text


async def test_shadow_verify_samples_a_fraction(engine: AsyncEngine) -> None:
    """shadow_verify=0.25 verifies about a quarter of the hits."""
    cache = SessionCache(async_sessionmaker(engine), shadow_verify=0.25)
    assert cache.verifier is not None
    draws = iter([0.1, 0.9, 0.5, 0.2] * 10)
    cache.verifier._sample = lambda: next(draws)
    async with cache.scope():
        for _ in range(41):
            await cached_execute(select(User.id).where(User.id == 1))
    assert cache.stats()["local"]["verified"] == 20


def test_shadow_verify_rate_is_checked(engine: AsyncEngine) -> None:
    """A shadow_verify rate outside [0, 1] is refused."""
    with pytest.raises(ValueError, match="shadow_verify"):
        SessionCache(async_sessionmaker(engine), shadow_verify=2)


async def test_shadow_verify_checks_shared_hits(engine: AsyncEngine, shared_region: Any) -> None:
    """Shared-region hits are verified too: entities rebuilt from a payload match the DB."""
    cache = SessionCache(
        async_sessionmaker(engine, expire_on_commit=False),
        regions={"shared": shared_region},
        shadow_verify=1.0,
    )
    try:
        for _ in range(3):
            async with cache.scope():
                await cached_execute(select(User).where(User.age > 24), region="shared")
    finally:
        await cache.aclose()
    stats = cache.stats()["shared"]
    assert (stats["hits"], stats["verified"], stats["mismatches"]) == (2, 2, 0)
