"""Statistics per region and per statement shape."""

from __future__ import annotations

from sqlalchemy import select, update

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
