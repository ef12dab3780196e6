"""Stable keys, payload envelopes and the bounded memory backend, without a database."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import joinedload, selectinload

from async_session_cache import AsyncSessionCacheError, SessionCache, cached_execute
from async_session_cache._memory import BoundedMemoryBackend
from async_session_cache._payload import UNLOADED, Payload, UnreadablePayload, dumps, loads
from async_session_cache._shapes import shape_of, stable_key
from async_session_cache._statements import statement_key
from async_session_cache._stores import Stored
from tests.models import Address, User

SQLITE = sqlite.dialect()


def key_of(statement: Any, dialect: Dialect = SQLITE) -> str:
    key = statement_key(statement)
    return stable_key(shape_of(statement, key, dialect), key)


def test_equal_statements_get_equal_string_keys() -> None:
    """Two separately built equal statements get the same stable string key."""
    build: Callable[[], Any] = lambda: (  # noqa: E731
        select(User).options(selectinload(User.addresses)).where(User.id.in_([1, 2])).limit(5)
    )
    assert key_of(build()) == key_of(build())
    assert isinstance(key_of(build()), str)


@pytest.mark.parametrize(
    "other",
    [
        lambda: select(User).where(User.id.in_([1, 3])),
        lambda: select(User).where(User.id.in_([1, 2, 3])),
        lambda: select(User).where(User.id.in_([1, 2])).limit(5),
        lambda: select(User).where(User.id.in_([1, 2])).offset(1),
        lambda: select(User).where(User.id.in_([1, 2])).options(selectinload(User.addresses)),
        lambda: select(User).where(User.id.in_([1, 2])).options(joinedload(User.addresses)),
        lambda: select(User).where(User.id.in_([1, 2])).execution_options(flag=True),
        lambda: select(User.__table__).where(User.__table__.c.id.in_([1, 2])),
        lambda: select(User.id, User.name).where(User.id.in_([1, 2])),
        lambda: select(User).where(User.id.in_([1, 2])).params(unused=1),
    ],
    ids=[
        "bound value",
        "in-list length",
        "limit",
        "offset",
        "selectinload",
        "joinedload",
        "execution option",
        "core instead of orm",
        "columns",
        "statement params",
    ],
)
def test_different_statements_get_different_keys(other: Callable[[], Any]) -> None:
    """Statements that differ in any way that changes the result get different keys."""
    base = select(User).where(User.id.in_([1, 2]))
    assert key_of(base) != key_of(other())


def test_statement_params_are_part_of_the_stable_key() -> None:
    """``.params()`` values differ, so do the keys; equal ones give equal keys."""
    template = select(User).where(User.id == bindparam("uid"))
    assert key_of(template.params(uid=1)) != key_of(template.params(uid=2))
    assert key_of(template.params(uid=1)) == key_of(template.params(uid=1))


def test_the_dialect_is_part_of_the_key() -> None:
    """The same statement compiled for two databases gets two keys."""
    statement = select(User).where(User.id == 1)
    assert key_of(statement, SQLITE) != key_of(statement, postgresql.asyncpg.dialect())


def test_schema_changes_change_the_namespace() -> None:
    """A change of a read table's column type changes the key (old payloads go unread)."""
    old = Table("things", MetaData(), Column("id", Integer, primary_key=True), Column("v", String))
    new = Table("things", MetaData(), Column("id", Integer, primary_key=True), Column("v", Integer))
    assert key_of(select(old).where(old.c.id == 1)) != key_of(select(new).where(new.c.id == 1))


def test_object_ids_in_values_are_refused() -> None:
    """A bound value whose repr holds an object id cannot make a stable key."""
    from async_session_cache._shapes import UnstableKeyError

    statement = select(User).where(User.name == object())  # type: ignore[comparison-overlap]
    key = statement_key(statement)
    with pytest.raises(UnstableKeyError):
        stable_key(shape_of(statement, key, SQLITE), key)


def _payload(rows: tuple[Any, ...], values: tuple[Any, ...] = ()) -> Payload:
    return Payload(
        width=len(rows[0]) if rows else 0,
        single_entity=False,
        filtered=False,
        requires_unique=False,
        entity_columns=(),
        mappers=("tests.models.User",),
        entities=((0, values, ()),) if values else (),
        rows=rows,
        has_mutable=False,
        has_unloaded=UNLOADED in values,
        nbytes=0,
    )


def test_envelope_round_trip_keeps_value_types() -> None:
    """Dates, decimals, UUIDs, bytes, JSON documents and None survive dumps/loads exactly."""
    row = (
        datetime.datetime(2026, 12, 4, 16, 30, 1, 5),
        datetime.date(2026, 1, 2),
        datetime.time(3, 4, 5),
        datetime.timedelta(days=1, seconds=2),
        decimal.Decimal("12.340"),
        uuid.UUID(int=7),
        b"\x00\xff",
        {"a": [1, 2, {"$dt": "not a tag"}], "b": None},
        [1, "two"],
        None,
        1.5,
        True,
        "text",
    )
    tokens, payload = loads(dumps(["t1", "t2"], _payload((row,), (1, UNLOADED, 3))))
    assert tokens == ("t1", "t2")
    assert payload.rows == (row,)
    assert payload.entities == ((0, (1, UNLOADED, 3), ()),)
    assert [type(v) for v in payload.rows[0]] == [type(v) for v in row]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"ASC3\n{not json",
        b"ASC3\n[1, 2]",
        b"ASC9\n[]",
        b"ASC3\n" + b'[["t"],1,false,false,false,false,[],[],false,[],[0],[[{"$nope":1}]]]',
    ],
    ids=["empty", "foreign", "truncated", "wrong structure", "other version", "unknown tag"],
)
def test_unreadable_envelopes_raise_one_error(data: bytes) -> None:
    """Anything but a well-formed envelope of this version raises UnreadablePayload."""
    with pytest.raises(UnreadablePayload):
        loads(data)


def test_truncated_real_envelope_is_unreadable() -> None:
    """A real envelope cut short is unreadable, not a crash."""
    data = dumps(["t"], _payload(((1, "a"), (2, "b"))))
    for cut in (len(data) // 2, len(data) - 1):
        with pytest.raises(UnreadablePayload):
            loads(data[:cut])


def test_bounded_memory_evicts_least_recently_used() -> None:
    """The memory backend keeps max_entries, evicting the least recently used and counting it."""
    backend = BoundedMemoryBackend({"max_entries": 3})
    for key in "abc":
        backend.set(key, key)
    backend.get("a")  # a is now the most recently used
    backend.set("d", "d")
    backend.set("e", "e")
    assert sorted(backend._data) == ["a", "d", "e"]
    assert backend.evictions == 2


def test_bounded_memory_get_multi_reads_and_refreshes_like_get() -> None:
    """get_multi (a hit's one call for an entry and its tokens) marks what it finds used."""
    backend = BoundedMemoryBackend({"max_entries": 3})
    for key in "abc":
        backend.set(key, key.upper())
    assert backend.get_multi(["a", "x", "b"]) == ["A", NO_VALUE, "B"]
    backend.set("d", "D")
    assert sorted(backend._data) == ["a", "b", "d"]


def test_bounded_memory_respects_max_bytes() -> None:
    """The memory backend evicts until the estimated bytes fit max_bytes."""

    class Sized:
        nbytes = 400

    backend = BoundedMemoryBackend({"max_entries": 100, "max_bytes": 1000})
    for i in range(5):
        backend.set(i, Sized())
    assert len(backend) == 2
    assert backend.bytes == 800
    assert backend.evictions == 3


async def test_evictions_show_in_stats(tmp_path: Any) -> None:
    """cache.stats() reports the evictions of a bounded shared region."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'e.db'}")
    region = make_region().configure("async_session_cache.memory", arguments={"max_entries": 2})
    cache = SessionCache(async_sessionmaker(engine), regions={"small": region})
    statements = [select(text(f"{n} AS n")) for n in range(3)]
    try:
        async with cache.scope():
            for statement in statements:
                await cached_execute(statement, region="small")
    finally:
        await engine.dispose()
    stats = cache.stats()["small"]
    assert stats["fills"] == 3
    assert stats["evictions"] >= 1


def test_backends_that_would_block_or_unpickle_are_refused() -> None:
    """A region on a backend that would block the loop or unpickle is a clear error."""
    engine = create_async_engine("sqlite+aiosqlite://")
    for backend in ("dogpile.cache.memory_pickle", "dogpile.cache.null"):
        region = make_region().configure(backend)
        with pytest.raises(AsyncSessionCacheError, match="block the event loop"):
            SessionCache(async_sessionmaker(engine), regions={"x": region})


def test_unconfigured_region_is_a_clear_error() -> None:
    """A region that was never configured is refused with a message saying so."""
    engine = create_async_engine("sqlite+aiosqlite://")
    with pytest.raises(AsyncSessionCacheError, match="not configured"):
        SessionCache(async_sessionmaker(engine), regions={"x": make_region()})


def test_address_loader_paths_are_part_of_the_shape() -> None:
    """Eager-loading a nested path is a different shape from loading the first hop only."""
    one = select(User).options(selectinload(User.addresses))
    two = select(User).options(selectinload(User.addresses).joinedload(Address.user))
    assert key_of(one) != key_of(two)


def test_plain_and_mixed_columns_round_trip() -> None:
    """Columns of plain JSON values and columns needing tags decode side by side."""
    rows = tuple(
        (i, f"name {i}", None if i % 2 else 1.5, datetime.date(2026, 1, 1 + i)) for i in range(5)
    )
    _, payload = loads(dumps(["t"], _payload(rows)))
    assert payload.rows == rows
    _, plain = loads(dumps(["t"], _payload(tuple(row[:3] for row in rows))))
    assert plain.rows == tuple(row[:3] for row in rows)
    assert all(type(row) is tuple for row in plain.rows)


@pytest.mark.parametrize("damage", ["short record", "unknown mapper"])
async def test_a_stored_payload_that_does_not_fit_is_a_miss(tmp_path: Any, damage: str) -> None:
    """A well-formed payload whose records do not fit this process's mappers (a column
    fewer, a mapper index it lacks) is counted as an error and read from the database."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/fit.db")
    try:
        async with engine.begin() as connection:
            await connection.run_sync(User.metadata.create_all)
            await connection.execute(
                User.__table__.insert(), [{"id": i, "name": f"u{i}", "age": 20 + i} for i in (1, 2)]
            )
        region = make_region().configure("async_session_cache.memory")
        cache = SessionCache(async_sessionmaker(engine), regions={"memory": region})
        statement = select(User).order_by(User.id)
        async with cache.scope():
            await cached_execute(statement, region="memory")
        backend = region.actual_backend
        [(key, (stored, _))] = [
            (key, item) for key, item in backend._data.items() if isinstance(item[0], Stored)
        ]
        mapper_index, values, relations = stored.payload.entities[0]
        if damage == "short record":
            record = (mapper_index, values[:-1], relations)
        else:
            record = (len(stored.payload.mappers) + 1, values, relations)
        entities = (record, *stored.payload.entities[1:])
        damaged = dataclasses.replace(
            stored.payload,
            entities=entities,
            _plans_cache=None,
            _columns_cache=None,
            _identities_cache=None,
            _attributes_cache=None,
        )
        backend.set(key, Stored(stored.tokens, stored.expires_at, damaged))
        async with cache.scope():
            users = (await cached_execute(statement, region="memory")).scalars().all()
            assert [(user.id, user.name) for user in users] == [(1, "u1"), (2, "u2")]
        stats = cache.stats()["memory"]
        assert (stats["errors"], stats["hits"], stats["misses"]) == (1, 0, 2)
    finally:
        await engine.dispose()
