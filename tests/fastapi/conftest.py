"""Fixtures for the FastAPI tests: a small seeded database, a SessionCache, a SQL counter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from dogpile.cache import make_region
from fastapi import FastAPI
from sqlalchemy import String, event, insert
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_cache import SessionCache


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


ITEMS = {1: "one", 2: "two", 3: "three"}


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An aiosqlite file database (a real connection pool) holding ``ITEMS``."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'items.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
        await connection.execute(insert(Item), [{"id": k, "name": v} for k, v in ITEMS.items()])
    yield engine
    await engine.dispose()


@pytest.fixture
def cache(engine: AsyncEngine) -> SessionCache:
    """A SessionCache with the local region and a bounded in-memory ``"shared"`` region."""
    return SessionCache(
        async_sessionmaker(engine, expire_on_commit=False),
        regions={"shared": make_region().configure("async_session_cache.memory")},
    )


class Statements:
    """Counts the statements an engine sends to the database."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *args: Any) -> None:
        self.count += 1


@pytest.fixture
def statements(engine: AsyncEngine) -> Statements:
    """The statement counter of ``engine`` (from now on)."""
    counter = Statements()
    event.listen(engine.sync_engine, "before_cursor_execute", counter)
    return counter


@asynccontextmanager
async def client_of(
    app: FastAPI, *, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client calling ``app`` in process (the app runs in the caller's task)."""
    transport = httpx.ASGITransport(app, raise_app_exceptions=raise_app_exceptions)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client
