"""The README's code blocks run, in order, as a newcomer would paste them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from tests.models import Base, seed
from tests.services import RedisServer

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    """The tour and the FastAPI example are both still in the README."""
    blocks = python_blocks()
    assert len(blocks) == 2
    assert "async def handle_request" in blocks[0]
    assert "session_dependency(cache)" in blocks[1]


@pytest.mark.redis
async def test_readme_examples_run(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tour runs against a seeded database and a real redis; the FastAPI example serves."""
    monkeypatch.chdir(tmp_path)  # the tour's sqlite file lands here
    tour, fastapi_example = python_blocks()
    namespace: dict[str, Any] = {}
    exec("from tests.models import Address, User", namespace)
    exec(tour.replace("redis://127.0.0.1:6379/0", redis_server.url), namespace)
    engine, cache = namespace["engine"], namespace["cache"]
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        async with async_sessionmaker(engine)() as session:
            await seed(session)
        assert await namespace["handle_request"](1) == "renamed"
        exec(fastapi_example, namespace)
        transport = httpx.ASGITransport(app=namespace["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/users/2")
        assert response.json() == {"id": 2, "name": "u1"}
        assert cache.stats()["redis"]["fills"] == 1
    finally:
        await cache.aclose()
        await engine.dispose()
