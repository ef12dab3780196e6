"""Fixtures for the behaviour tests: a seeded database, a SQL counter, a SessionCache.

The database fixture is parametrized: aiosqlite (the embedded default) and a real
PostgreSQL through asyncpg, started by the tests (see ``tests/conftest.py``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from dogpile.cache import CacheRegion, make_region
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from async_session_cache import SessionCache
from tests.models import Base, seed


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A seeded engine on each supported database."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    else:
        url = request.getfixturevalue("postgres_server").url
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
    async with async_sessionmaker(engine)() as session:
        await seed(session)
    yield engine
    await engine.dispose()


class SQLLog:
    """The SQL statements an engine ran, for asserting what reached the database."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    @property
    def selects(self) -> list[str]:
        return [s for s in self.statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]

    def count(self) -> int:
        return len(self.statements)


@pytest.fixture
def sql(engine: AsyncEngine) -> Iterator[SQLLog]:
    """Records every statement sent to the database from here on."""
    log = SQLLog()
    event.listen(engine.sync_engine, "before_cursor_execute", log)
    yield log
    event.remove(engine.sync_engine, "before_cursor_execute", log)


@pytest.fixture
def cache(engine: AsyncEngine) -> SessionCache:
    """A SessionCache whose sessions keep instances loaded across commits."""
    return SessionCache(async_sessionmaker(engine, expire_on_commit=False))


@pytest.fixture
def expiring_cache(engine: AsyncEngine) -> SessionCache:
    """A SessionCache whose sessions expire instances on commit (SQLAlchemy's default)."""
    return SessionCache(async_sessionmaker(engine, expire_on_commit=True))


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def shared_region(request: pytest.FixtureRequest) -> CacheRegion:
    """A shared region on each store: the bounded in-process LRU and a real redis-server
    (keys under a prefix of their own, so tests never see each other's entries)."""
    if request.param == "memory":
        return make_region().configure("async_session_cache.memory")
    server = request.getfixturevalue("redis_server")
    return make_region().configure(
        "async_session_cache.redis",
        arguments={"url": server.url, "prefix": f"test-{uuid.uuid4().hex}", "timeout": 2.0},
    )


@pytest.fixture
async def shared_cache(
    engine: AsyncEngine, shared_region: CacheRegion
) -> AsyncIterator[SessionCache]:
    """A SessionCache with one shared region, "shared", on each store."""
    cache = SessionCache(
        async_sessionmaker(engine, expire_on_commit=False), regions={"shared": shared_region}
    )
    yield cache
    await cache.aclose()
