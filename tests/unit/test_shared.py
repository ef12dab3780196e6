"""Shared regions: results shared across scopes, rebuilt in each session, fresh after commits.

Every test runs on both stores (the bounded in-process LRU and a real redis-server) and both
databases (aiosqlite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import String, TypeDecorator, bindparam, inspect, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import joinedload, selectinload

from async_session_cache import (
    FromCache,
    SessionCache,
    UncacheableStatementWarning,
    cached_execute,
    invalidate,
)
from tests.models import Address, Audit, Tag, User, UserTag
from tests.unit.conftest import SQLLog
from tests.unit.test_cached_execute import CONSUMERS, STATEMENTS, _normal

SHARED_CONSUMERS = ("all", "scalars", "mappings", "unique", "first")


@pytest.mark.parametrize("consumer", SHARED_CONSUMERS)
@pytest.mark.parametrize("name", sorted(STATEMENTS))
async def test_hit_in_another_scope_matches_uncached_execute(
    shared_cache: SessionCache, sql: SQLLog, name: str, consumer: str
) -> None:
    """A result filled in one scope is served to another scope, equal to execute(), no SQL."""
    build, consume = STATEMENTS[name], CONSUMERS[consumer]
    async with shared_cache.scope() as session:
        expected = _normal(consume(await session.execute(build())))
        missed = _normal(consume(await cached_execute(build(), region="shared")))
    async with shared_cache.scope():
        before = sql.count()
        hit = _normal(consume(await cached_execute(build(), region="shared")))
        assert sql.count() == before, "a shared hit must not reach the database"
    assert missed == expected
    assert hit == expected
    assert shared_cache.stats()["shared"]["hits"] == 1


async def test_entities_are_rebuilt_attached_to_the_readers_session(
    shared_cache: SessionCache, sql: SQLLog
) -> None:
    """A hit's entities belong to the reading session: identity-mapped, persistent, no SQL."""
    statement = select(User).options(selectinload(User.addresses)).where(User.id <= 3)
    async with shared_cache.scope():
        await cached_execute(statement, region="shared")
    async with shared_cache.scope() as session:
        queries = sql.count()
        users = (await cached_execute(statement, region="shared")).scalars().all()
        assert [u.id for u in sorted(users, key=lambda u: u.id)] == [1, 2, 3]
        for user in users:
            state = inspect(user)
            assert state.persistent and state.session is session.sync_session
            assert not state.modified
            assert await session.get(User, user.id) is user
            assert [a.email for a in user.addresses] == [
                f"u{user.id - 1}-0@example.com",
                f"u{user.id - 1}-1@example.com",
            ]
            assert all(address in session for address in user.addresses)
        assert sql.count() == queries


async def test_entities_with_a_composite_primary_key_are_identity_mapped(
    shared_cache: SessionCache, sql: SQLLog
) -> None:
    """A hit's entities keyed by two columns are found by ``get()`` under that key."""
    statement = select(UserTag).where(UserTag.user_id <= 2)
    async with shared_cache.scope():
        await cached_execute(statement.order_by(UserTag.user_id, UserTag.tag_id), region="shared")
    async with shared_cache.scope() as session:
        queries = sql.count()
        rows = (
            (
                await cached_execute(
                    statement.order_by(UserTag.user_id, UserTag.tag_id), region="shared"
                )
            )
            .scalars()
            .all()
        )
        assert [(row.user_id, row.tag_id) for row in rows] == [(1, 1), (1, 2), (2, 2), (2, 3)]
        for row in rows:
            assert await session.get(UserTag, (row.user_id, row.tag_id)) is row
        assert sql.count() == queries


async def test_statement_params_key_shared_entries(shared_cache: SessionCache) -> None:
    """Executions of one template with different ``.params()`` never share an entry."""
    template = select(User.name).where(User.id == bindparam("uid"))
    for _ in range(2):  # fill, then hit
        async with shared_cache.scope():
            names = [
                (await cached_execute(template.params(uid=uid), region="shared")).scalar()
                for uid in (1, 2)
            ]
        assert names == ["u0", "u1"]
    assert shared_cache.stats()["shared"]["hits"] == 2


async def test_rebuilt_entities_write_back_like_loaded_ones(
    shared_cache: SessionCache, engine: AsyncEngine, sql: SQLLog
) -> None:
    """Changing an entity served from a shared region emits the UPDATE on commit."""
    statement = select(User).where(User.id == 5)
    async with shared_cache.scope():
        await cached_execute(statement, region="shared")
    async with shared_cache.scope() as session:
        user = (await cached_execute(statement, region="shared")).scalar_one()
        user.name = "written"
        await session.commit()
    async with shared_cache.scope() as session:
        stored = (await session.execute(select(User.name).where(User.id == 5))).scalar_one()
    assert stored == "written"


async def test_instances_already_in_the_session_are_reused(shared_cache: SessionCache) -> None:
    """A hit returns the instance the session already holds, keeping its pending change."""
    statement = select(User).where(User.id <= 2).order_by(User.id)
    async with shared_cache.scope():
        await cached_execute(statement, region="shared")
    async with shared_cache.scope() as session:
        mine = await session.get(User, 1)
        assert mine is not None
        mine.age = 77
        users = (await cached_execute(statement, region="shared")).scalars().all()
        assert users[0] is mine
        assert users[0].age == 77


async def test_commit_makes_entries_of_written_tables_stale(
    shared_cache: SessionCache, sql: SQLLog
) -> None:
    """Once commit() returns, other scopes' cached reads of the written table are fresh."""
    by_id = select(User.name).where(User.id == 3)
    tags = select(Tag.label).order_by(Tag.id)
    async with shared_cache.scope():
        assert (await cached_execute(by_id, region="shared")).scalar_one() == "u2"
        await cached_execute(tags, region="shared")
    async with shared_cache.scope() as writer:
        await writer.execute(update(User).where(User.id == 3).values(name="fresh"))
        await writer.commit()
    async with shared_cache.scope():
        assert (await cached_execute(by_id, region="shared")).scalar_one() == "fresh"
        queries = sql.count()
        await cached_execute(tags, region="shared")  # tags were not written: still a hit
        assert sql.count() == queries


async def test_orm_flush_commit_invalidates(shared_cache: SessionCache) -> None:
    """An ORM change flushed and committed invalidates shared entries reading that table."""
    statement = select(Address.email).where(Address.user_id == 1).order_by(Address.id)
    async with shared_cache.scope():
        await cached_execute(statement, region="shared")
    async with shared_cache.scope() as writer:
        address = await writer.get(Address, 1)
        assert address is not None
        address.email = "new@example.com"
        await writer.commit()
    async with shared_cache.scope():
        emails = (await cached_execute(statement, region="shared")).scalars().all()
    assert emails[0] == "new@example.com"


async def test_uncommitted_writes_never_reach_other_scopes(shared_cache: SessionCache) -> None:
    """A session's reads of tables it wrote in its open transaction do not fill the region."""
    statement = select(User.name).where(User.id == 4)
    async with shared_cache.scope() as writer:
        await writer.execute(update(User).where(User.id == 4).values(name="uncommitted"))
        own = (await cached_execute(statement, region="shared")).scalar_one()
        async with shared_cache.scope():
            other = (await cached_execute(statement, region="shared")).scalar_one()
        await writer.rollback()
    async with shared_cache.scope():
        after = (await cached_execute(statement, region="shared")).scalar_one()
    assert own == "uncommitted"  # read-your-writes, through the local region
    assert other == "u3"
    assert after == "u3"


async def test_unrelated_uncommitted_write_still_uses_the_region(
    shared_cache: SessionCache, sql: SQLLog
) -> None:
    """Writing one table in a transaction leaves shared reads of other tables shared."""
    statement = select(Tag.label).order_by(Tag.id)
    async with shared_cache.scope():
        await cached_execute(statement, region="shared")
    async with shared_cache.scope() as session:
        session.add(Audit(note="busy"))
        await session.flush()
        queries = sql.count()
        await cached_execute(statement, region="shared")
        assert sql.count() == queries


async def test_invalidate_drops_a_shared_entry(shared_cache: SessionCache, sql: SQLLog) -> None:
    """invalidate(stmt, region=...) makes the next read of that statement a miss."""
    statement = select(User.id).where(User.age > 25)
    async with shared_cache.scope():
        await cached_execute(statement, region="shared")
        await invalidate(statement, region="shared")
        queries = len(sql.selects)
        await cached_execute(statement, region="shared")
        assert len(sql.selects) == queries + 1


async def test_expiration_time_bounds_a_shared_entry(
    shared_cache: SessionCache, sql: SQLLog
) -> None:
    """A shared entry is not served after its expiration_time."""
    statement = select(User.id).where(User.age > 26)
    async with shared_cache.scope():
        await cached_execute(statement, region="shared", expiration_time=0.2)
        queries = len(sql.selects)
        await cached_execute(statement, region="shared", expiration_time=0.2)
        assert len(sql.selects) == queries
        await asyncio.sleep(0.3)
        await cached_execute(statement, region="shared", expiration_time=0.2)
        assert len(sql.selects) == queries + 1


async def test_from_cache_uses_the_shared_region(shared_cache: SessionCache, sql: SQLLog) -> None:
    """FromCache("shared") fills in one scope and serves another without SQL."""
    statement = select(User).where(User.age < 23).order_by(User.id).options(FromCache("shared"))
    async with shared_cache.scope() as session:
        first = [u.id for u in (await session.execute(statement)).scalars()]
    async with shared_cache.scope() as session:
        queries = sql.count()
        users = (await session.execute(statement)).scalars().all()
        assert sql.count() == queries
        assert all(user in session for user in users)
    assert [u.id for u in users] == first == [1, 2, 3]


async def test_concurrent_misses_across_scopes_run_one_query(
    shared_cache: SessionCache, sql: SQLLog
) -> None:
    """Concurrent misses of one key from many scopes share a single query."""
    statement: Callable[[], Any] = lambda: select(User).where(User.age >= 21).order_by(User.id)  # noqa: E731

    async def request() -> list[int]:
        async with shared_cache.scope():
            return [u.id for u in (await cached_execute(statement(), region="shared")).scalars()]

    results = await asyncio.gather(*(request() for _ in range(50)))
    assert all(r == list(range(2, 11)) for r in results)
    assert len(sql.selects) == 1
    stats = shared_cache.stats()["shared"]
    assert stats["misses"] == 1
    assert stats["coalesced"] + stats["hits"] == 49


async def test_joined_eager_collection_requires_unique_on_a_shared_hit(
    shared_cache: SessionCache,
) -> None:
    """A shared hit of a joined-eager collection demands unique(), as execute() does."""
    from sqlalchemy.exc import InvalidRequestError

    statement = select(User).options(joinedload(User.addresses)).where(User.id <= 2)
    async with shared_cache.scope():
        (await cached_execute(statement, region="shared")).unique().scalars().all()
    async with shared_cache.scope():
        result = await cached_execute(statement, region="shared")
        with pytest.raises(InvalidRequestError, match="unique"):
            result.scalars().all()
        users = (await cached_execute(statement, region="shared")).unique().scalars().all()
    assert sorted(len(u.addresses) for u in users) == [2, 2]


async def test_after_commit_the_session_reads_the_shared_region_again(
    shared_cache: SessionCache, sql: SQLLog
) -> None:
    """Once its transaction is committed, a session's reads of the tables it wrote are shared
    again, and see other sessions' later commits (not its own stale local entries)."""
    statement = select(User.name).where(User.id == 7)
    async with shared_cache.scope() as first:
        await first.execute(update(User).where(User.id == 7).values(name="mine"))
        await first.commit()
        assert (await cached_execute(statement, region="shared")).scalar_one() == "mine"
        async with shared_cache.scope() as second:
            await second.execute(update(User).where(User.id == 7).values(name="theirs"))
            await second.commit()
        assert (await cached_execute(statement, region="shared")).scalar_one() == "theirs"
        queries = len(sql.selects)
        await cached_execute(statement, region="shared")
        assert len(sql.selects) == queries  # a shared hit again


async def test_a_read_only_commit_invalidates_nothing(
    shared_cache: SessionCache, sql: SQLLog
) -> None:
    """A commit after an earlier committed write does not invalidate the written tables again."""
    statement = select(User.name).where(User.id == 8)
    async with shared_cache.scope() as session:
        await session.execute(update(User).where(User.id == 8).values(name="once"))
        await session.commit()
        await cached_execute(statement, region="shared")
        await session.commit()  # nothing written in this transaction
        queries = len(sql.selects)
        await cached_execute(statement, region="shared")
        assert len(sql.selects) == queries


async def test_a_burst_of_reads_of_one_key_makes_one_network_read(
    shared_cache: SessionCache, sql: SQLLog
) -> None:
    """Concurrent hits of one key share a single store read on a network store (an
    in-process store is read by each hit, without awaiting)."""
    shared = shared_cache.shared("shared")
    assert shared is not None
    statement: Callable[[], Any] = lambda: select(User.name).where(User.id == 9)  # noqa: E731
    async with shared_cache.scope():
        await cached_execute(statement(), region="shared")
    reads = 0
    if shared.store.remote:
        original = shared.store.read

        async def counting_read(*args: Any) -> Any:
            nonlocal reads
            reads += 1
            return await original(*args)

        shared.store.read = counting_read  # type: ignore[method-assign]
    else:
        original_now = shared.store.read_now  # type: ignore[attr-defined]

        def counting_read_now(*args: Any) -> Any:
            nonlocal reads
            reads += 1
            return original_now(*args)

        shared.store.read_now = counting_read_now  # type: ignore[attr-defined]

    async def request() -> str:
        async with shared_cache.scope():
            return str((await cached_execute(statement(), region="shared")).scalar_one())

    queries = len(sql.selects)
    names = await asyncio.gather(*(request() for _ in range(200)))
    assert names == ["u8"] * 200
    assert len(sql.selects) == queries
    assert reads == (1 if shared.store.remote else 200)
    assert shared_cache.stats()["shared"]["errors"] == 0


class _Name:
    """A bound value whose text form is an object address, different in every process."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Name) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


class _NameType(TypeDecorator[_Name]):
    impl = String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return value.value if isinstance(value, _Name) else value


async def test_values_without_a_stable_text_form(shared_cache: SessionCache, sql: SQLLog) -> None:
    """An in-process region keys on the value itself and shares the result; redis, which
    needs a key every process agrees on, keeps it in the local region and says so."""
    shared = shared_cache.shared("shared")
    assert shared is not None
    build: Callable[[], Any] = lambda: select(User.id).where(  # noqa: E731
        User.name == bindparam("name", _Name("u3"), type_=_NameType())
    )
    async with shared_cache.scope():
        if shared.store.remote:
            with pytest.warns(UncacheableStatementWarning, match="no stable text form"):
                first = (await cached_execute(build(), region="shared")).scalar_one()
        else:
            first = (await cached_execute(build(), region="shared")).scalar_one()
    async with shared_cache.scope():
        queries = len(sql.selects)
        again = (await cached_execute(build(), region="shared")).scalar_one()
        reached_database = len(sql.selects) > queries
    assert first == again == 4
    assert reached_database is shared.store.remote
    assert shared_cache.stats()["shared"]["hits"] == (0 if shared.store.remote else 1)
