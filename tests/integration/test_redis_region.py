"""A shared region on a real redis-server: stalls, outages, corrupt entries, dead lock
holders and stampedes never cost correctness, and never block the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import selectinload

from async_session_cache import FromCache, SessionCache, _payload, cached_execute
from async_session_cache._shapes import PAYLOAD_VERSION
from tests.integration._child import SQLLog, redis_region, user_by_id, users_and_emails
from tests.models import Base, User, seed
from tests.services import RedisServer, free_port, run_redis

pytestmark = pytest.mark.redis

LOGGER = "async_session_cache"
MAGIC = _payload.MAGIC + str(PAYLOAD_VERSION).encode() + b"\n"  # the envelope header


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A seeded SQLite database file."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    async with async_sessionmaker(engine)() as session:
        await seed(session)
    yield engine
    await engine.dispose()


@asynccontextmanager
async def session_cache(
    engine: AsyncEngine, url: str, prefix: str, **options: Any
) -> AsyncIterator[SessionCache]:
    """A SessionCache with one redis region, "shared"; its redis client closed on exit."""
    timeout = options.setdefault("timeout", 0.2)
    cache = SessionCache(
        async_sessionmaker(engine, expire_on_commit=False),
        regions={"shared": redis_region(url, prefix, timeout=timeout)},
        **options,
    )
    try:
        yield cache
    finally:
        await cache.aclose()


async def entry_keys(client: Redis, prefix: str) -> list[bytes]:
    """The entry keys under ``prefix`` (no version tokens, no fill locks)."""
    return sorted(
        [
            key
            async for key in client.scan_iter(match=f"{prefix}:*")
            if b":v:" not in key and b":lock:" not in key
        ]
    )


async def uncached(engine: AsyncEngine, statement: Any) -> list[Any]:
    """The users ``statement`` returns from a plain session, as comparable tuples."""
    async with async_sessionmaker(engine)() as session:
        return [(u.id, u.name, u.age) for u in (await session.execute(statement)).scalars()]


async def read_users(cache: SessionCache, statement: Any) -> list[Any]:
    """``statement`` through the shared region in a fresh scope, as comparable tuples."""
    async with cache.scope():
        users = (await cached_execute(statement, region="shared")).scalars().all()
        return [(u.id, u.name, u.age) for u in users]


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """The library's log messages containing ``text``."""
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


# -- 1. a stalled redis ------------------------------------------------------------------------


async def test_a_stalled_redis_never_blocks_the_event_loop(
    engine: AsyncEngine, sql: SQLLog, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While redis is paused, a cached read returns the database's rows within the timeout,
    other tasks on the loop keep running, and hits resume once redis answers again."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    statement = user_by_id(3)
    with run_redis() as server:
        control = Redis.from_url(server.url)
        try:
            async with session_cache(
                engine, server.url, prefix, timeout=0.2, retry_interval=0.1
            ) as cache:
                assert await read_users(cache, statement) == [(3, "u2", 22)]
                assert cache.stats()["shared"]["fills"] == 1

                await control.execute_command("CLIENT", "PAUSE", 1500, "ALL")
                paused_at = time.monotonic()
                stop = asyncio.Event()
                gaps: list[float] = []

                async def tick() -> None:
                    last = time.monotonic()
                    while not stop.is_set():
                        await asyncio.sleep(0.005)
                        now = time.monotonic()
                        gaps.append(now - last)
                        last = now

                ticker = asyncio.create_task(tick())
                selects_before = len(sql.selects)
                rows = await read_users(cache, statement)
                returned_after = time.monotonic() - paused_at
                stop.set()
                await ticker

                assert rows == [(3, "u2", 22)]
                assert len(sql.selects) == selects_before + 1  # served by the database
                assert returned_after < 1.0, returned_after
                assert len(gaps) >= 10 and max(gaps) < 0.1, max(gaps)
                assert cache.stats()["shared"]["errors"] >= 1
                assert len(messages(caplog, "is unavailable")) == 1

                # CLIENT UNPAUSE would itself wait for the pause (PAUSE ALL holds every
                # client), so the event that the pause is over is this PING returning.
                await control.ping()
                assert time.monotonic() - paused_at > 0.1  # retry_interval has passed
                hits, selects_before = cache.stats()["shared"]["hits"], len(sql.selects)
                assert await read_users(cache, statement) == [(3, "u2", 22)]
                assert cache.stats()["shared"]["hits"] == hits + 1
                assert len(sql.selects) == selects_before
                assert len(messages(caplog, "recovered after")) == 1
        finally:
            await control.aclose()


# -- 2. redis down, then up --------------------------------------------------------------------


async def test_redis_down_reads_the_database_warns_once_and_recovers(
    engine: AsyncEngine,
    sql: SQLLog,
    prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With nothing listening on the region's port every read returns the database's rows,
    one warning covers the outage, and once redis starts there the region fills then hits."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    retry_interval = 0.05
    statement = select(User).where(User.age >= 27).order_by(User.id)
    expected = await uncached(engine, statement)
    assert [row[0] for row in expected] == [8, 9, 10]
    server: asyncio.subprocess.Process | None = None
    control = Redis.from_url(url)
    try:
        async with session_cache(
            engine, url, prefix, timeout=0.2, retry_interval=retry_interval
        ) as cache:
            stats = cache.region_stats("shared")
            calls, selects_before = 0, len(sql.selects)
            deadline = time.monotonic() + 5
            while stats.errors < 3:  # outlive several retry intervals
                assert time.monotonic() < deadline, "the region never retried the store"
                assert await read_users(cache, statement) == expected
                calls += 1
                await asyncio.sleep(retry_interval / 2)
            assert calls >= 3
            assert len(sql.selects) == selects_before + calls
            assert (stats.hits, stats.fills) == (0, 0)
            assert len(messages(caplog, "is unavailable")) == 1
            assert messages(caplog, "recovered after") == []

            server = await asyncio.create_subprocess_exec(
                "redis-server",
                *("--port", str(port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", str(tmp_path)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while True:
                try:
                    await control.ping()
                    break
                except Exception:
                    assert server.returncode is None, "redis-server exited"
                    assert time.monotonic() < deadline, "redis-server did not start"
                    await asyncio.sleep(0.02)
            await asyncio.sleep(retry_interval * 2)  # the region retries after retry_interval

            selects_before, misses = len(sql.selects), stats.misses
            assert await read_users(cache, statement) == expected
            assert (stats.fills, stats.misses) == (1, misses + 1)
            assert len(sql.selects) == selects_before + 1
            assert len(await entry_keys(control, prefix)) == 1

            assert await read_users(cache, statement) == expected
            assert stats.hits == 1
            assert len(sql.selects) == selects_before + 1
            assert len(messages(caplog, "recovered after")) == 1
            assert len(messages(caplog, "is unavailable")) == 1
    finally:
        await control.aclose()
        if server is not None and server.returncode is None:
            server.terminate()
            await server.wait()


# -- 3. corrupt entries ------------------------------------------------------------------------


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "garbage": lambda data: b"garbage",
    "truncated": lambda data: data[: len(data) // 2],
    "other-version": lambda data: b"ASC9\n" + data[len(MAGIC) :],
    "wrong-structure": lambda data: MAGIC + json.dumps({"rows": [[1, "u1"]]}).encode(),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
async def test_a_corrupt_entry_is_a_miss_and_is_refilled(
    engine: AsyncEngine,
    sql: SQLLog,
    redis_server: RedisServer,
    raw: Redis,
    prefix: str,
    corrupt: Callable[[bytes], bytes],
) -> None:
    """An entry overwritten with bytes that are not a readable payload is read as a miss: the
    call returns the database's rows without raising, and the entry is refilled and hit."""
    statement = (
        select(User).options(selectinload(User.addresses)).where(User.age > 26).order_by(User.id)
    )
    async with async_sessionmaker(engine)() as session:
        expected = users_and_emails((await session.execute(statement)).scalars().all())

    async def read() -> list[Any]:
        async with cache.scope():
            result = await cached_execute(statement, region="shared")
            return users_and_emails(result.scalars().all())

    async with session_cache(engine, redis_server.url, prefix, timeout=2.0) as cache:
        stats = cache.region_stats("shared")
        assert await read() == expected
        (key,) = await entry_keys(raw, prefix)
        original = await raw.get(key)
        assert original is not None and original.startswith(MAGIC)

        await raw.set(key, corrupt(original))
        selects_before = len(sql.selects)
        assert await read() == expected
        assert len(sql.selects) > selects_before  # the rows came from the database

        selects_before, hits = len(sql.selects), stats.hits
        assert await read() == expected
        assert stats.hits == hits + 1, cache.stats()["shared"]
        assert len(sql.selects) == selects_before
        assert await raw.get(key) == original


# -- 4. a dead lock holder ---------------------------------------------------------------------


@pytest.mark.parametrize("lock_ttl", [0.4, 5.0], ids=["lock-expires", "lock-outlives-wait"])
async def test_a_dead_fill_lock_holder_delays_a_miss_by_at_most_lock_timeout(
    engine: AsyncEngine,
    sql: SQLLog,
    redis_server: RedisServer,
    raw: Redis,
    prefix: str,
    lock_ttl: float,
) -> None:
    """A fill lock held by a process that never fills makes a miss wait (up to lock_timeout),
    then run the query itself and store the entry."""
    statement = user_by_id(4)
    async with session_cache(
        engine, redis_server.url, prefix, timeout=2.0, lock_timeout=0.4
    ) as cache:
        stats = cache.region_stats("shared")
        assert await read_users(cache, statement) == [(4, "u3", 23)]
        (key,) = await entry_keys(raw, prefix)
        await raw.delete(key)
        lock_key = f"{prefix}:lock:".encode() + key[len(prefix) + 1 :]
        assert await raw.set(lock_key, b"dead-holder", px=int(lock_ttl * 1000), nx=True)

        started = time.monotonic()
        selects_before = len(sql.selects)
        assert await read_users(cache, statement) == [(4, "u3", 23)]
        elapsed = time.monotonic() - started
        assert 0.3 <= elapsed < 1.5, elapsed  # it waited for the holder, but not forever
        assert len(sql.selects) == selects_before + 1
        assert stats.fills == 2
        assert await raw.get(key) is not None

        selects_before = len(sql.selects)
        assert await read_users(cache, statement) == [(4, "u3", 23)]
        assert stats.hits == 1
        assert len(sql.selects) == selects_before


# -- 5. a stampede in one process --------------------------------------------------------------


async def test_a_thousand_concurrent_misses_run_one_select(
    tmp_path: Path, redis_server: RedisServer, raw: Redis, prefix: str
) -> None:
    """1,000 scopes missing one key at once on a redis region run a single SELECT on a single
    pooled connection; every scope gets the same rows."""
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", pool_size=5, max_overflow=0
    )
    checkouts: list[object] = []
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        async with async_sessionmaker(engine)() as session:
            await seed(session)
        event.listen(engine.sync_engine, "checkout", lambda *args: checkouts.append(args[1]))
        statement = select(User).where(User.age > 25).order_by(User.id)

        with SQLLog(engine) as sql:
            async with session_cache(engine, redis_server.url, prefix, timeout=5.0) as cache:

                async def one() -> list[Any]:
                    async with cache.scope():
                        return [
                            (u.id, u.name)
                            for u in (await cached_execute(statement, region="shared")).scalars()
                        ]

                results = await asyncio.gather(*(one() for _ in range(1000)))
                stats = cache.stats()["shared"]

        assert len(sql.selects) == 1, stats
        assert len(checkouts) == 1, stats  # the waiters never took a connection
        assert results[0] == [(7, "u6"), (8, "u7"), (9, "u8"), (10, "u9")]
        assert all(rows == results[0] for rows in results)
        assert stats["errors"] == 0
        assert stats["misses"] == 1
        assert stats["coalesced"] + stats["hits"] == 999, stats
    finally:
        await engine.dispose()


# -- 6. the ORM-option route -------------------------------------------------------------------


async def test_from_cache_on_redis_serves_entities_of_the_new_session(
    engine: AsyncEngine, sql: SQLLog, redis_server: RedisServer, raw: Redis, prefix: str
) -> None:
    """``FromCache("shared")`` on a redis region: the second execution, in another scope,
    runs no SQL and returns equal entities that belong to that scope's session."""
    statement = select(User).where(User.age.between(21, 23)).options(FromCache("shared"))
    async with session_cache(engine, redis_server.url, prefix) as cache:
        async with cache.scope() as first_session:
            first = (await first_session.execute(statement)).scalars().all()
            first_rows = [(u.id, u.name, u.age) for u in first]
        assert first_rows == [(2, "u1", 21), (3, "u2", 22), (4, "u3", 23)]
        assert len(await entry_keys(raw, prefix)) == 1
        selects_before = len(sql.selects)

        async with cache.scope() as session:
            second = (await session.execute(statement)).scalars().all()
            assert len(sql.selects) == selects_before
            assert [(u.id, u.name, u.age) for u in second] == first_rows
            assert all(u in session for u in second)
            assert not any(u is v for u, v in zip(first, second, strict=True))
            assert await session.get(User, 3) is second[1]  # in its identity map
            assert len(sql.selects) == selects_before
        stats = cache.stats()["shared"]
        assert (stats["misses"], stats["fills"], stats["hits"]) == (1, 1, 1)
