"""RelationshipCache: relationship loads served from a region, fresh after writes."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from async_session_cache import RelationshipCache, SessionCache
from tests.models import Address, User
from tests.unit.conftest import SQLLog


def eager(region: str) -> Any:
    return (
        select(User)
        .where(User.id <= 3)
        .order_by(User.id)
        .options(selectinload(User.addresses), RelationshipCache(User.addresses, region))
    )


def emails(users: Any) -> list[list[str]]:
    return [[a.email for a in u.addresses] for u in users]


async def test_selectin_loads_come_from_the_shared_region(
    shared_cache: SessionCache, sql: SQLLog
) -> None:
    """In a new scope the eager addresses load is served from the region: one SELECT less."""
    async with shared_cache.scope() as session:
        first = emails((await session.execute(eager("shared"))).scalars())
        assert len(sql.selects) == 2
    async with shared_cache.scope() as session:
        users = (await session.execute(eager("shared"))).scalars().all()
        assert len(sql.selects) == 3  # only the users query ran
        assert emails(users) == first
        assert all(a in session for u in users for a in u.addresses)


async def test_lazy_loads_of_loaded_instances_use_the_option(
    shared_cache: SessionCache, sql: SQLLog
) -> None:
    """Instances loaded with RelationshipCache lazy-load that relationship from the region."""
    statement = (
        select(User).where(User.id == 2).options(RelationshipCache(User.addresses, "shared"))
    )
    async with shared_cache.scope() as session:
        user = (await session.execute(statement)).scalar_one()
        first = [a.email for a in await user.awaitable_attrs.addresses]
    queries = len(sql.selects)
    async with shared_cache.scope() as session:
        user = (await session.execute(statement)).scalar_one()
        again = [a.email for a in await user.awaitable_attrs.addresses]
    assert len(sql.selects) == queries + 1  # the users query; the lazy load was a hit
    assert again == first == ["u1-0@example.com", "u1-1@example.com"]


async def test_relationship_entries_are_invalidated_by_commits(shared_cache: SessionCache) -> None:
    """After a committed change to an address, the cached relationship load is fresh."""
    async with shared_cache.scope() as session:
        await session.execute(eager("shared"))
    async with shared_cache.scope() as writer:
        address = await writer.get(Address, 1)
        assert address is not None
        address.email = "renamed@example.com"
        await writer.commit()
    async with shared_cache.scope() as session:
        users = (await session.execute(eager("shared"))).scalars().all()
    assert emails(users)[0][0] == "renamed@example.com"


async def test_local_region_relationship_cache(cache: SessionCache, sql: SQLLog) -> None:
    """With the local region, a repeated eager load in one scope runs only the users query."""
    async with cache.scope() as session:
        await session.execute(eager("local"))
        session.expire_all()
        queries = len(sql.selects)
        users = (await session.execute(eager("local"))).scalars().all()
        assert len(sql.selects) == queries + 2  # expired instances are not served: refilled
        queries = len(sql.selects)
        again = (await session.execute(eager("local"))).scalars().all()
        assert len(sql.selects) == queries + 1
    assert emails(again) == emails(users)


async def test_other_relationships_are_not_cached(shared_cache: SessionCache, sql: SQLLog) -> None:
    """A RelationshipCache for one relationship leaves other eager loads alone."""
    statement = (
        select(User)
        .where(User.id == 1)
        .options(selectinload(User.tags), RelationshipCache(User.addresses, "shared"))
    )
    async with shared_cache.scope() as session:
        await session.execute(statement)
    async with shared_cache.scope() as session:
        queries = len(sql.selects)
        await session.execute(statement)
        assert len(sql.selects) == queries + 2


def test_relationship_cache_needs_a_relationship() -> None:
    """RelationshipCache on a column attribute is a TypeError."""
    with pytest.raises(TypeError, match="relationship"):
        RelationshipCache(User.name)  # type: ignore[arg-type]
