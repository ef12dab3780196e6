"""The local region stays correct under the session's own writes (pitfalls 3 and 4)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from async_session_cache import SessionCache, cached_execute
from tests.models import (
    Address,
    Audit,
    Employee,
    Manager,
    Tag,
    User,
    UserWithCount,
    as_plain,
    user_tags,
)
from tests.unit.conftest import SQLLog


async def committed_name(engine: AsyncEngine, user_id: int) -> str:
    """The name stored in the database, read through a session of its own."""
    async with async_sessionmaker(engine)() as session:
        name = await session.scalar(select(User.name).where(User.id == user_id))
    assert name is not None
    return name


async def test_hit_keeps_a_pending_change_with_autoflush(
    cache: SessionCache, engine: AsyncEngine
) -> None:
    """A cached read never discards a pending change: it is flushed, then committed (pitfall 3)."""
    async with cache.scope() as session:
        user = (await cached_execute(select(User).where(User.id == 1))).scalar_one()
        user.name = "renamed"
        again = (await cached_execute(select(User).where(User.id == 1))).scalar_one()
        assert again is user
        assert again.name == "renamed"
        await session.commit()
    assert await committed_name(engine, 1) == "renamed"


async def test_hit_keeps_a_pending_change_without_autoflush(engine: AsyncEngine) -> None:
    """With autoflush off the hit returns the same dirty instance, and commit writes it."""
    cache = SessionCache(async_sessionmaker(engine, expire_on_commit=False, autoflush=False))
    async with cache.scope() as session:
        user = (await cached_execute(select(User).where(User.id == 2))).scalar_one()
        user.name = "pending"
        again = (await cached_execute(select(User).where(User.id == 2))).scalar_one()
        assert again is user
        assert again.name == "pending"
        assert user in session.dirty
        await session.commit()
    assert await committed_name(engine, 2) == "pending"


async def test_flush_invalidates_reads_of_the_written_table(cache: SessionCache) -> None:
    """After a rename is flushed, a cached filter on the old name is not served (pitfall 4)."""
    by_old_name = select(User).where(User.name == "u1")
    async with cache.scope() as session:
        assert len((await cached_execute(by_old_name)).scalars().all()) == 1
        user = await session.get(User, 2)
        assert user is not None
        user.name = "p2"
        await session.flush()
        assert (await cached_execute(by_old_name)).scalars().all() == []
        assert [
            u.id for u in (await cached_execute(select(User).where(User.name == "p2"))).scalars()
        ] == [2]


async def test_autoflushed_change_invalidates_before_lookup(cache: SessionCache) -> None:
    """An unflushed rename is flushed by the cached read itself, so the old filter misses."""
    by_old_name = select(User.id).where(User.name == "u1")
    async with cache.scope() as session:
        assert (await cached_execute(by_old_name)).scalars().all() == [2]
        user = await session.get(User, 2)
        assert user is not None
        user.name = "changed"
        assert (await cached_execute(by_old_name)).scalars().all() == []


async def test_commit_with_expire_on_commit_serves_fresh_instances(
    expiring_cache: SessionCache,
) -> None:
    """After a commit expires everything, a read reloads instead of serving expired objects."""
    async with expiring_cache.scope() as session:
        users = (await cached_execute(select(User).order_by(User.id))).scalars().all()
        session.add(Audit(note="commit"))
        await session.commit()
        again = (await cached_execute(select(User).order_by(User.id))).scalars().all()
        assert [u.name for u in again] == [f"u{i}" for i in range(10)]  # no MissingGreenlet
        assert again[0] is users[0]


async def test_expired_or_expunged_instances_are_not_served(
    cache: SessionCache, sql: SQLLog
) -> None:
    """An entry whose instance was expired, expunged or deleted is a miss."""
    statement = select(User).where(User.id <= 3).order_by(User.id)
    async with cache.scope() as session:
        users = (await cached_execute(statement)).scalars().all()
        session.expire(users[0], ["name"])
        queries = len(sql.selects)
        again = (await cached_execute(statement)).scalars().all()
        assert len(sql.selects) == queries + 1
        assert again[0].name == "u0"

        session.expunge(users[1])
        again = (await cached_execute(statement)).scalars().all()
        assert len(sql.selects) == queries + 2
        assert again[1] in session
        assert again[1] is not users[1]

        await session.delete(again[2])
        await session.flush()
        after_delete = (await cached_execute(statement)).scalars().all()
        assert [u.id for u in after_delete] == [1, 2]


async def test_rollback_drops_entries_holding_discarded_writes(
    cache: SessionCache, sql: SQLLog
) -> None:
    """Reads filled after a write are dropped by rollback; the committed state is served."""
    ages = select(User.age).where(User.id == 1)
    async with cache.scope() as session:
        await session.execute(update(User).where(User.id == 1).values(age=99))
        assert (await cached_execute(ages)).scalar_one() == 99
        await session.rollback()
        assert (await cached_execute(ages)).scalar_one() == 20


async def test_unrelated_write_keeps_entries(cache: SessionCache, sql: SQLLog) -> None:
    """A write to a table an entry does not read leaves the entry in place."""
    async with cache.scope() as session:
        await cached_execute(select(User.id))
        session.add(Audit(note="hello"))
        await session.flush()
        queries = len(sql.selects)
        await cached_execute(select(User.id))
        assert len(sql.selects) == queries


@pytest.mark.parametrize(
    "write",
    [
        lambda: update(User).where(User.id == 1).values(name="bulk"),
        lambda: delete(Address).where(Address.user_id == 1),
        lambda: insert(User).values(id=50, name="new", age=50),
        lambda: User.__table__.update().where(User.__table__.c.id == 1).values(age=1),
        lambda: user_tags.delete().where(user_tags.c.user_id == 1),
    ],
    ids=["orm bulk update", "orm bulk delete", "orm insert", "core update", "m2m core delete"],
)
async def test_dml_through_the_session_invalidates(cache: SessionCache, sql: SQLLog, write) -> None:  # type: ignore[no-untyped-def]
    """ORM bulk and Core DML run by the session invalidate reads of their table."""
    statement = (
        select(User)
        .options(selectinload(User.addresses), selectinload(User.tags))
        .order_by(User.id)
    )
    async with cache.scope() as session:
        await cached_execute(statement)
        queries = len(sql.selects)
        await session.execute(write())
        await cached_execute(statement)
        assert len(sql.selects) > queries


async def test_text_write_invalidates_everything(cache: SessionCache, sql: SQLLog) -> None:
    """text() may write anything, so it drops every entry."""
    async with cache.scope() as session:
        await cached_execute(select(User.id))
        await cached_execute(select(Tag.id))
        await session.execute(text("UPDATE tags SET label = 'x'"))
        queries = len(sql.selects)
        assert set((await cached_execute(select(Tag.label))).scalars()) == {"x"}
        await cached_execute(select(User.id))
        assert len(sql.selects) == queries + 2


async def test_eager_load_entry_depends_on_the_loaded_table(
    cache: SessionCache, sql: SQLLog
) -> None:
    """An entry that eager-loads addresses is refreshed when an address changes."""
    statement = select(User).options(selectinload(User.addresses)).where(User.id == 1)
    async with cache.scope() as session:
        user = (await cached_execute(statement)).scalar_one()
        user.addresses[0].email = "changed@example.com"
        await session.flush()
        queries = len(sql.selects)
        await cached_execute(statement)
        assert len(sql.selects) > queries


async def test_many_to_many_change_invalidates(cache: SessionCache) -> None:
    """Changing a many-to-many collection invalidates reads joining the association table."""
    tagged = select(User.id).join(User.tags).where(Tag.label == "t0").order_by(User.id)
    async with cache.scope() as session:
        before = (await cached_execute(tagged)).scalars().all()
        user = await session.get(User, 2, options=[selectinload(User.tags)])
        assert user is not None and 2 not in before
        tag = await session.get(Tag, 1)
        user.tags.append(tag)  # type: ignore[arg-type]
        after = (await cached_execute(tagged)).scalars().all()
    assert after == sorted([*before, 2])


async def test_another_session_commit_is_not_this_scopes_business(
    cache: SessionCache, engine: AsyncEngine
) -> None:
    """The local region is per scope: another scope reads committed data afresh."""
    async with cache.scope():
        assert (await cached_execute(select(User.name).where(User.id == 3))).scalar_one() == "u2"
    async with AsyncSession(engine) as other:
        await other.execute(update(User).where(User.id == 3).values(name="elsewhere"))
        await other.commit()
    async with cache.scope():
        name = (await cached_execute(select(User.name).where(User.id == 3))).scalar_one()
    assert name == "elsewhere"


async def test_rollback_drops_every_entry_filled_after_the_first_write(
    cache: SessionCache, sql: SQLLog
) -> None:
    """Entries filled inside a rolled-back transaction after its first write are dropped."""
    tags = select(Tag.label).order_by(Tag.id)
    async with cache.scope() as session:
        before = select(User.id).where(User.id == 1)
        await cached_execute(before)
        session.add(Audit(note="first write"))
        await session.flush()
        await cached_execute(tags)  # filled after the first write, reads another table
        await session.rollback()
        queries = len(sql.selects)
        await cached_execute(before)  # filled before the write: still served
        assert len(sql.selects) == queries
        await cached_execute(tags)
        assert len(sql.selects) == queries + 1


async def test_text_writes_can_declare_their_tables(cache: SessionCache, sql: SQLLog) -> None:
    """A text() write with cache_writes drops only the declared tables' entries."""
    async with cache.scope() as session:
        await cached_execute(select(User.id))
        await cached_execute(select(Tag.id))
        await session.execute(
            text("UPDATE tags SET label = 'y'").execution_options(cache_writes=["tags"])
        )
        queries = len(sql.selects)
        await cached_execute(select(User.id))
        assert len(sql.selects) == queries
        assert set((await cached_execute(select(Tag.label))).scalars()) == {"y"}
        await session.execute(
            text("UPDATE audit SET note = 'n'").execution_options(cache_writes=[Audit.__table__])
        )
        await cached_execute(select(User.id))
        assert len(sql.selects) == queries + 1


def _cte_counts() -> Any:
    counts = (
        select(Address.user_id, func.count().label("n")).group_by(Address.user_id).cte("counts")
    )
    return select(User.name, counts.c.n).join(counts, counts.c.user_id == User.id).order_by(User.id)


DEPENDENT_READS = {
    "joined inheritance": (
        lambda: select(Manager),
        lambda: update(Employee.__table__).values(name="x"),
    ),
    "polymorphic base": (
        lambda: select(Employee).order_by(Employee.id),
        lambda: update(Manager.__table__).values(budget=1),
    ),
    "cte": (_cte_counts, lambda: delete(Address).where(Address.id == 1)),
    "subquery": (
        lambda: select(User.id).where(User.id.in_(select(Address.user_id).where(Address.id < 5))),
        lambda: delete(Address).where(Address.id == 2),
    ),
    "column property": (
        lambda: select(UserWithCount).order_by(UserWithCount.id),
        lambda: delete(Address).where(Address.id == 3),
    ),
}


@pytest.mark.parametrize("name", sorted(DEPENDENT_READS))
async def test_reads_depend_on_every_table_they_touch(
    cache: SessionCache, sql: SQLLog, name: str
) -> None:
    """Inheritance tables, CTEs, subqueries and column properties count as tables read."""
    read, write = DEPENDENT_READS[name]
    async with cache.scope() as session:
        await cached_execute(read())
        queries = len(sql.selects)
        await cached_execute(read())
        assert len(sql.selects) == queries  # cached
        await session.execute(write())
        fresh = (await cached_execute(read())).all()
        assert len(sql.selects) > queries  # the write made it a miss
        truth = (await session.execute(read().execution_options(populate_existing=True))).all()
    assert as_plain(fresh) == as_plain(truth)


@pytest.mark.parametrize("name", sorted(DEPENDENT_READS))
async def test_shared_reads_depend_on_every_table_they_touch(
    shared_cache: SessionCache, name: str
) -> None:
    """A commit to a table reached through inheritance, a CTE, a subquery or a column
    property makes the shared entry stale."""
    read, write = DEPENDENT_READS[name]
    async with shared_cache.scope():
        await cached_execute(read(), region="shared")
    async with shared_cache.scope() as writer:
        await writer.execute(write())
        await writer.commit()
    async with shared_cache.scope() as session:
        fresh = (await cached_execute(read(), region="shared")).all()
        truth = (await session.execute(read())).all()
    assert as_plain(fresh) == as_plain(truth)
    assert shared_cache.statement_stats()["shared"][0]["misses"] == 2
