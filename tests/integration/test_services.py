"""The service fixtures give working servers."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.services import PostgresServer, RedisServer


@pytest.mark.redis
async def test_redis_server_round_trip(redis_server: RedisServer) -> None:
    """A value SET through redis.asyncio comes back from GET on the fixture's server."""
    client = Redis.from_url(redis_server.url)
    try:
        await client.set("asc:ping", b"pong")
        assert await client.get("asc:ping") == b"pong"
    finally:
        await client.delete("asc:ping")
        await client.aclose()


@pytest.mark.postgres
async def test_postgres_server_select_one(postgres_server: PostgresServer) -> None:
    """SELECT 1 runs through SQLAlchemy + asyncpg, on the server and on a fresh database."""
    name = "asc_services_check"
    for url in (postgres_server.url, postgres_server.create_database(name)):
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
                database = (await conn.execute(text("SELECT current_database()"))).scalar_one()
                assert database == url.rsplit("/", 1)[1]
        finally:
            await engine.dispose()
    postgres_server.drop_database(name)
