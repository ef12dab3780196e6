"""Several processes sharing one redis region: same keys and payloads everywhere, one fill
per stampede across processes, and a commit in one process seen by the next read in another.

The other processes are ``python -m tests.integration._child`` (see that module).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from async_session_cache import SessionCache, cached_execute
from tests.integration._child import (
    SLEEP_SECONDS,
    SQLLog,
    redis_region,
    user_by_id,
    user_by_name,
    users_and_emails,
    users_with_addresses,
)
from tests.models import Base, seed
from tests.services import PostgresServer, RedisServer

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT = 60.0


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a database every process can open: a SQLite file, or a PostgreSQL
    database of this test's own."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """The parent's engine on the seeded database file."""
    engine = create_async_engine(db_url)
    await create_and_seed(engine)
    yield engine
    await engine.dispose()


async def create_and_seed(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    async with async_sessionmaker(engine)() as session:
        await seed(session)


@asynccontextmanager
async def session_cache(engine: AsyncEngine, url: str, prefix: str) -> AsyncIterator[SessionCache]:
    """The parent's SessionCache with the redis region "shared"; its client closed on exit."""
    cache = SessionCache(
        async_sessionmaker(engine, expire_on_commit=False),
        regions={"shared": redis_region(url, prefix, timeout=2.0)},
        timeout=2.0,
    )
    try:
        yield cache
    finally:
        await cache.aclose()


async def entry_keys(client: Redis, prefix: str) -> list[bytes]:
    """The entry keys under ``prefix`` (no version tokens, fill locks or test signals)."""
    signals = {f"{prefix}:ready".encode(), f"{prefix}:go".encode()}
    return sorted(
        [
            key
            async for key in client.scan_iter(match=f"{prefix}:*")
            if b":v:" not in key and b":lock:" not in key and key not in signals
        ]
    )


async def start_child(**config: Any) -> asyncio.subprocess.Process:
    """Start ``tests.integration._child`` with ``config`` in this interpreter (the venv's)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration._child",
        json.dumps(config),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def child_report(child: asyncio.subprocess.Process) -> dict[str, Any]:
    """Wait for ``child`` to exit successfully and return its JSON report."""
    try:
        out, err = await asyncio.wait_for(child.communicate(), CHILD_TIMEOUT)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == 0, err.decode(errors="replace")
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


async def read_users(cache: SessionCache, statement: Any) -> list[Any]:
    """``statement`` through the shared region in a fresh scope, as comparable tuples."""
    async with cache.scope():
        users = (await cached_execute(statement, region="shared")).scalars().all()
        return [(u.id, u.name, u.age) for u in users]


# -- 7. the same key and payload in every process ----------------------------------------------


async def test_another_process_reads_the_parents_entry_without_sql(
    engine: AsyncEngine,
    sql: SQLLog,
    db_url: str,
    redis_server: RedisServer,
    raw: Redis,
    prefix: str,
) -> None:
    """An eager-loading query filled by this process is a hit, with no SQL and equal rows
    (users and their addresses), in a separate Python process using the same prefix."""
    async with session_cache(engine, redis_server.url, prefix) as cache:
        async with cache.scope():
            result = await cached_execute(users_with_addresses(), region="shared")
            parent_rows = users_and_emails(result.scalars().all())
        assert cache.stats()["shared"]["fills"] == 1
    assert [row[0] for row in parent_rows] == [6, 7, 8, 9, 10]
    assert all(len(emails) == 2 for _, _, emails in parent_rows)
    assert len(sql.selects) == 2  # users, then their addresses
    (key,) = await entry_keys(raw, prefix)

    report = await child_report(
        await start_child(mode="read", db=db_url, url=redis_server.url, prefix=prefix)
    )

    assert report["sql"] == 0
    assert report["rows"] == json.loads(json.dumps(parent_rows))
    assert await entry_keys(raw, prefix) == [key]  # the child used the very same key


# -- 8. one fill across processes --------------------------------------------------------------


@pytest.mark.postgres
async def test_concurrent_misses_in_four_processes_run_one_query(
    postgres_server: PostgresServer, redis_server: RedisServer, raw: Redis, prefix: str
) -> None:
    """Four processes missing one key at the same moment run its slow query once: one fills,
    the others wait on the cross-process fill lock and read its entry."""
    url = postgres_server.create_database()
    try:
        engine = create_async_engine(url)
        try:
            await create_and_seed(engine)
        finally:
            await engine.dispose()
        config = {"mode": "slow", "db": url, "url": redis_server.url, "prefix": prefix}
        children = [await start_child(**config) for _ in range(4)]
        try:
            deadline = time.monotonic() + CHILD_TIMEOUT
            while int(await raw.get(f"{prefix}:ready") or 0) < 4:
                for child in children:
                    assert child.returncode is None, (await child.communicate())[1].decode()
                assert time.monotonic() < deadline, "the children never got ready"
                await asyncio.sleep(0.01)
            await raw.set(f"{prefix}:go", b"1")
            reports = [await child_report(child) for child in children]
        finally:
            for child in children:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
    finally:
        postgres_server.drop_database(url.rsplit("/", 1)[1])

    assert sum(report["pg_sleep"] for report in reports) == 1, reports
    assert all(report["rows"] == [[7]] for report in reports)
    (filler,) = [report for report in reports if report["pg_sleep"] == 1]
    assert filler["elapsed"] >= SLEEP_SECONDS
    assert (filler["stats"]["misses"], filler["stats"]["fills"]) == (1, 1)
    waiters = [report["stats"] for report in reports if report is not filler]
    assert all(s["misses"] == 0 and s["coalesced"] + s["hits"] == 1 for s in waiters), waiters
    assert sum(s["coalesced"] for s in waiters) >= 1  # at least one waited on the lock
    assert len(await entry_keys(raw, prefix)) == 1


# -- 9. freshness across processes -------------------------------------------------------------


async def test_a_commit_in_another_process_is_seen_by_the_next_read(
    engine: AsyncEngine,
    sql: SQLLog,
    db_url: str,
    redis_server: RedisServer,
    raw: Redis,
    prefix: str,
) -> None:
    """After another process commits an UPDATE through its SessionCache, this process's next
    read of entries it had cached (and hit) before the write returns the new data."""
    by_id, by_name = user_by_id(3), user_by_name("u2")
    async with session_cache(engine, redis_server.url, prefix) as cache:
        stats = cache.region_stats("shared")
        for statement in (by_id, by_name):
            assert await read_users(cache, statement) == [(3, "u2", 22)]
            selects_before, hits = len(sql.selects), stats.hits
            assert await read_users(cache, statement) == [(3, "u2", 22)]
            assert (len(sql.selects), stats.hits) == (selects_before, hits + 1)

        report = await child_report(
            await start_child(
                mode="write",
                db=db_url,
                url=redis_server.url,
                prefix=prefix,
                user_id=3,
                name="renamed",
            )
        )
        assert report == {"committed": True, "updates": 1}

        selects_before, hits = len(sql.selects), stats.hits
        assert await read_users(cache, by_id) == [(3, "renamed", 22)]
        assert await read_users(cache, by_name) == []
        assert len(sql.selects) == selects_before + 2  # both were misses
        assert stats.hits == hits
        assert await read_users(cache, by_id) == [(3, "renamed", 22)]  # and refilled
        assert stats.hits == hits + 1
