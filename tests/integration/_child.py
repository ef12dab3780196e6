"""Helpers shared by the redis integration tests, and the child process they start.

The statements and the region configuration live here so the parent test and the child
process build byte-for-byte the same ones. Run as a child with::

    python -m tests.integration._child '<json config>'

The config names a ``mode`` (``read``, ``slow``, ``write``), the database URL ``db``, the redis
``url`` and key ``prefix``; the child prints one JSON report on its last stdout line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from dogpile.cache import CacheRegion, make_region
from redis.asyncio import Redis
from sqlalchemy import Select, event, func, literal, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import selectinload

from async_session_cache import SessionCache, cached_execute
from tests.models import User

REDIS_BACKEND = "async_session_cache.redis"
SLEEP_SECONDS = 0.3


def redis_region(url: str, prefix: str, timeout: float = 0.2) -> CacheRegion:
    """A shared region on the redis at ``url``, its keys under ``prefix``."""
    return make_region().configure(
        REDIS_BACKEND, arguments={"url": url, "prefix": prefix, "timeout": timeout}
    )


def users_with_addresses() -> Select[Any]:
    """Users older than 24 with their addresses loaded eagerly (selectinload)."""
    return select(User).options(selectinload(User.addresses)).where(User.age > 24).order_by(User.id)


def user_by_id(user_id: int) -> Select[Any]:
    """One user by primary key."""
    return select(User).where(User.id == user_id)


def user_by_name(name: str) -> Select[Any]:
    """Users with one name."""
    return select(User).where(User.name == name)


def slow_seven() -> Select[Any]:
    """A cacheable PostgreSQL SELECT (no ``text()``) that takes SLEEP_SECONDS and returns 7."""
    return select(literal(7).label("x")).where(func.pg_sleep(SLEEP_SECONDS).is_not(None))


def users_and_emails(users: Any) -> list[list[Any]]:
    """ORM users as ``[id, name, [address emails]]`` (addresses must already be loaded)."""
    return [[u.id, u.name, [a.email for a in u.addresses]] for u in users]


class SQLLog:
    """Every statement an engine sends to its database while attached."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.statements: list[str] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    def __enter__(self) -> SQLLog:
        event.listen(self.engine.sync_engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine.sync_engine, "before_cursor_execute", self)

    @property
    def selects(self) -> list[str]:
        return [s for s in self.statements if s.lstrip().upper().startswith("SELECT")]


# -- the child process ----------------------------------------------------------------------


async def _read(
    cache: SessionCache, engine: AsyncEngine, sql: SQLLog, config: dict[str, Any]
) -> dict[str, Any]:
    async with cache.scope():
        result = await cached_execute(users_with_addresses(), region="shared")
        rows = users_and_emails(result.scalars().all())
    return {"sql": len(sql.statements), "rows": rows, "stats": cache.stats()["shared"]}


async def _slow(
    cache: SessionCache, engine: AsyncEngine, sql: SQLLog, config: dict[str, Any]
) -> dict[str, Any]:
    """Get ready (database and redis connections open), report ready, wait for the go key,
    then run the slow statement through the shared region."""
    prefix = config["prefix"]
    async with engine.connect() as connection:
        await connection.execute(select(1))
    signals = Redis.from_url(config["url"])
    try:
        await cache.regions["shared"].actual_backend.client().ping()
        await signals.incr(f"{prefix}:ready")
        deadline = time.monotonic() + 30
        while not await signals.exists(f"{prefix}:go"):
            if time.monotonic() > deadline:
                raise TimeoutError("no go signal from the parent")
            await asyncio.sleep(0.002)
    finally:
        await signals.aclose()
    started = time.monotonic()
    async with cache.scope():
        rows = [list(row) for row in (await cached_execute(slow_seven(), region="shared")).all()]
    return {
        "pg_sleep": sum("pg_sleep" in s for s in sql.selects),
        "rows": rows,
        "elapsed": time.monotonic() - started,
        "stats": cache.stats()["shared"],
    }


async def _write(
    cache: SessionCache, engine: AsyncEngine, sql: SQLLog, config: dict[str, Any]
) -> dict[str, Any]:
    async with cache.scope() as session:
        user = await session.get(User, config["user_id"])
        assert user is not None
        user.name = config["name"]
        await session.commit()
    return {"committed": True, "updates": sum("UPDATE" in s.upper() for s in sql.statements)}


MODES: dict[str, Callable[..., Any]] = {"read": _read, "slow": _slow, "write": _write}


async def main(config: dict[str, Any]) -> dict[str, Any]:
    engine = create_async_engine(config["db"])
    cache = SessionCache(
        async_sessionmaker(engine, expire_on_commit=False),
        regions={"shared": redis_region(config["url"], config["prefix"], timeout=2.0)},
        timeout=2.0,
        lock_timeout=5.0,
    )
    try:
        with SQLLog(engine) as sql:
            report: dict[str, Any] = await MODES[config["mode"]](cache, engine, sql, config)
    finally:
        await cache.aclose()
        await engine.dispose()
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))))
