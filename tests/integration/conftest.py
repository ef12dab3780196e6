"""Fixtures shared by the integration tests; each module provides its own ``engine``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration._child import SQLLog
from tests.services import RedisServer


@pytest.fixture
def sql(engine: AsyncEngine) -> Iterator[SQLLog]:
    """Records the statements the test's engine sends from here on."""
    with SQLLog(engine) as log:
        yield log


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"it-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def raw(redis_server: RedisServer, prefix: str) -> AsyncIterator[Redis]:
    """A plain client of the shared redis; deletes the test's keys afterwards."""
    client = Redis.from_url(redis_server.url)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
