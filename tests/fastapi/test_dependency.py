"""session_dependency: one scope per request, visible to what the endpoint awaits, always closed.

Endpoints are declared inside the tests, so this module does not use
``from __future__ import annotations``: FastAPI resolves string annotations against module
globals only, and the ``Annotated`` aliases here are local.
"""

import asyncio
import contextvars
import gc
import re
import textwrap
import threading
import weakref
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

import async_session_cache.fastapi as cache_fastapi
from async_session_cache import OutsideScopeError, SessionCache, cached_execute
from async_session_cache._cache import current_scope
from async_session_cache.fastapi import SyncEndpointError, session_dependency
from tests.fastapi.conftest import ITEMS, Item, Statements, client_of


def assert_closed(cache: SessionCache, engine: AsyncEngine) -> None:
    """No scope, session, registry entry or checked-out connection is left."""
    assert cache.stats()["local"]["sessions"] == 0
    assert cache.session.registry.registry == {}
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert current_scope.get() is None


async def item_name(item_id: int) -> str:
    """A helper the endpoints await: reads through the request's scope, no session passed."""
    result = await cached_execute(select(Item.name).where(Item.id == item_id))
    name: str = result.scalar_one()
    return name


async def test_cached_execute_works_in_endpoint_and_awaited_helper(
    cache: SessionCache, engine: AsyncEngine
) -> None:
    """cached_execute needs no session argument in the endpoint or in a helper it awaits."""
    SessionDep = Annotated[AsyncSession, Depends(session_dependency(cache))]
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def get_item(item_id: int, session: SessionDep) -> dict[str, Any]:
        item = (await cached_execute(select(Item).where(Item.id == item_id))).scalar_one()
        return {
            "name": item.name,
            "helper": await item_name(item_id),
            "scoped": cache.session() is session,
            "attached": item in session,
        }

    async with client_of(app) as client:
        for item_id, name in ITEMS.items():
            response = await client.get(f"/items/{item_id}")
            assert response.json() == {
                "name": name,
                "helper": name,
                "scoped": True,
                "attached": True,
            }
    assert_closed(cache, engine)


async def test_second_read_in_a_request_runs_no_sql(
    cache: SessionCache, engine: AsyncEngine, statements: Statements
) -> None:
    """Within one request, repeating a read (local or shared region) sends no statement."""
    SessionDep = Annotated[AsyncSession, Depends(session_dependency(cache))]
    app = FastAPI()

    @app.get("/twice/{region}")
    async def twice(region: str, session: SessionDep) -> list[int]:
        counts = []
        for _ in range(3):
            before = statements.count
            await cached_execute(select(Item).where(Item.id == 2), region=region)
            counts.append(statements.count - before)
        return counts

    async with client_of(app) as client:
        assert (await client.get("/twice/local")).json() == [1, 0, 0]
        # The local region starts empty in every request; the shared one does not.
        assert (await client.get("/twice/local")).json() == [1, 0, 0]
        assert (await client.get("/twice/shared")).json() == [1, 0, 0]
        assert (await client.get("/twice/shared")).json() == [0, 0, 0]
    assert_closed(cache, engine)


@pytest.mark.parametrize(
    ("path", "status"),
    [("/ok", 200), ("/http-error", 404), ("/crash", 500)],
)
async def test_scope_closed_after_response_and_errors(
    cache: SessionCache, engine: AsyncEngine, path: str, status: int
) -> None:
    """After a normal response, an HTTPException or an unhandled error, the scope is closed."""
    SessionDep = Annotated[AsyncSession, Depends(session_dependency(cache))]
    app = FastAPI()
    seen: list[AsyncSession] = []

    async def read(session: AsyncSession) -> None:
        seen.append(session)
        await cached_execute(select(Item))
        assert engine.pool.checkedout() == 1  # the request holds a connection

    @app.get("/ok")
    async def ok(session: SessionDep) -> str:
        await read(session)
        return "ok"

    @app.get("/http-error")
    async def http_error(session: SessionDep) -> str:
        await read(session)
        raise HTTPException(404, "nope")

    @app.get("/crash")
    async def crash(session: SessionDep) -> str:
        await read(session)
        raise RuntimeError("boom")

    async with client_of(app, raise_app_exceptions=False) as client:
        assert (await client.get(path)).status_code == status
    assert_closed(cache, engine)
    assert not seen[0].in_transaction()


async def test_unhandled_error_reaches_the_caller_and_scope_closes(
    cache: SessionCache, engine: AsyncEngine
) -> None:
    """The endpoint's own exception propagates unchanged through the dependency."""
    SessionDep = Annotated[AsyncSession, Depends(session_dependency(cache))]
    app = FastAPI()

    @app.get("/crash")
    async def crash(session: SessionDep) -> None:
        await cached_execute(select(Item))
        raise LookupError("boom")

    async with client_of(app) as client:
        with pytest.raises(LookupError, match="boom"):
            await client.get("/crash")
    assert_closed(cache, engine)


@pytest.mark.parametrize("while_", ["awaiting", "querying"])
async def test_scope_closed_when_request_is_cancelled(
    cache: SessionCache, engine: AsyncEngine, while_: str
) -> None:
    """A request cancelled mid-way (client gone) still closes its session and returns the
    connection, whether it was awaiting something else or a query was running."""
    SessionDep = Annotated[AsyncSession, Depends(session_dependency(cache))]
    app = FastAPI()
    entered, never = asyncio.Event(), asyncio.Event()
    query_running = threading.Event()
    await engine.dispose()  # new connections get the query_started() SQL function

    @event.listens_for(engine.sync_engine, "connect")
    def add_function(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.create_function("query_started", 0, query_running.set)

    slow = text(  # about a second of SQLite work after it calls query_started()
        "WITH RECURSIVE c(x) AS (SELECT 1 + coalesce(query_started(), 0) "
        "UNION ALL SELECT x + 1 FROM c WHERE x < 5000000) SELECT count(*) FROM c"
    )

    @app.get("/wait")
    async def wait(session: SessionDep) -> str:
        await cached_execute(select(Item))
        entered.set()
        if while_ == "awaiting":
            await never.wait()
        else:
            await session.execute(slow)
        return "unreachable"

    async with client_of(app) as client:
        request = asyncio.create_task(client.get("/wait"))
        await entered.wait()
        if while_ == "querying":
            assert await asyncio.to_thread(query_running.wait, 10)
        assert cache.stats()["local"]["sessions"] == 1
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    assert_closed(cache, engine)


async def test_concurrent_requests_never_share_a_session(
    cache: SessionCache, engine: AsyncEngine
) -> None:
    """Requests in flight together each get their own session, scope and rows."""
    SessionDep = Annotated[AsyncSession, Depends(session_dependency(cache))]
    app = FastAPI()
    parallel = 12
    all_inside = asyncio.Barrier(parallel)

    @app.get("/items/{item_id}")
    async def get_item(item_id: int, session: SessionDep) -> dict[str, Any]:
        before = await item_name(item_id)
        await all_inside.wait()  # every request holds its scope open at this point
        return {
            "session": id(session),
            "scoped": id(cache.session()),
            "before": before,
            "after": await item_name(item_id),
        }

    async with client_of(app) as client:
        ids = [1 + n % len(ITEMS) for n in range(parallel)]
        responses = await asyncio.gather(*(client.get(f"/items/{i}") for i in ids))
    bodies = [r.json() for r in responses]
    assert len({body["session"] for body in bodies}) == parallel
    for item_id, body in zip(ids, bodies, strict=True):
        assert body["scoped"] == body["session"]
        assert body["before"] == body["after"] == ITEMS[item_id]
    assert_closed(cache, engine)


async def test_same_cache_gives_one_dependency_and_one_session_per_request(
    cache: SessionCache, engine: AsyncEngine
) -> None:
    """Declaring session_dependency(cache) twice still opens one scope per request."""
    assert session_dependency(cache) is session_dependency(cache)
    app = FastAPI()

    async def helper(
        session: Annotated[AsyncSession, Depends(session_dependency(cache))],
    ) -> int:
        return id(session)

    @app.get("/")
    async def endpoint(
        helper_session: Annotated[int, Depends(helper)],
        session: Annotated[AsyncSession, Depends(session_dependency(cache))],
    ) -> bool:
        return helper_session == id(session) == id(cache.session())

    async with client_of(app) as client:
        assert (await client.get("/")).json() is True
    assert_closed(cache, engine)


async def test_dependency_does_not_keep_the_cache_alive(engine: AsyncEngine) -> None:
    """A SessionCache given to session_dependency is garbage-collected once unreferenced."""
    cache = SessionCache(async_sessionmaker(engine))
    session_dependency(cache)
    dead = weakref.ref(cache)
    del cache
    gc.collect()
    assert dead() is None


async def test_sync_endpoint_taking_the_session_is_refused(
    cache: SessionCache, engine: AsyncEngine
) -> None:
    """A plain def endpoint declaring the session fails at request time with a clear error."""
    SessionDep = Annotated[AsyncSession, Depends(session_dependency(cache))]
    app = FastAPI()

    @app.get("/sync")
    def sync_endpoint(session: SessionDep) -> str:
        raise AssertionError("never runs")

    async with client_of(app) as client:
        with pytest.raises(SyncEndpointError, match=re.escape("declare it `async def`")):
            await client.get("/sync")
    assert_closed(cache, engine)
    assert isinstance(SyncEndpointError(sync_endpoint), TypeError)


async def test_sync_endpoint_under_router_level_scope_works(
    cache: SessionCache, engine: AsyncEngine
) -> None:
    """A def endpoint that does not take the session may sit under a router-wide scope."""
    router = APIRouter(dependencies=[Depends(session_dependency(cache))])
    opened: list[int] = []

    @router.get("/sync")
    def sync_endpoint() -> str:
        opened.append(cache.stats()["local"]["sessions"])
        return "ok"

    @router.get("/async")
    async def async_endpoint() -> str:
        return (await cached_execute(select(Item.name).where(Item.id == 1))).scalar_one()

    app = FastAPI()
    app.include_router(router)
    async with client_of(app) as client:
        assert (await client.get("/sync")).json() == "ok"
        assert (await client.get("/async")).json() == ITEMS[1]
    assert opened == [1]
    assert_closed(cache, engine)


class Repository:
    """What a sync wrapper dependency typically builds from the session."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def name(self, item_id: int) -> str:
        return await item_name(item_id)


async def test_sync_wrapper_dependency_keeps_the_scope(
    cache: SessionCache, engine: AsyncEngine, statements: Statements
) -> None:
    """A def dependency wrapping the session (pitfall 8) runs in a thread, yet the endpoint's
    awaited reads still run in the request's scope and are cached."""
    SessionDep = Annotated[AsyncSession, Depends(session_dependency(cache))]
    app = FastAPI()

    def repository(session: SessionDep) -> Repository:
        return Repository(session)

    @app.get("/items/{item_id}")
    async def get_item(
        item_id: int, repo: Annotated[Repository, Depends(repository)]
    ) -> dict[str, Any]:
        first = await repo.name(item_id)
        before = statements.count
        second = await repo.name(item_id)
        return {
            "names": [first, second],
            "sql": statements.count - before,
            "same": repo.session is cache.session(),
        }

    async with client_of(app) as client:
        response = await client.get("/items/3")
    assert response.json() == {"names": [ITEMS[3]] * 2, "sql": 0, "same": True}
    assert_closed(cache, engine)


async def test_contextvar_set_in_sync_dependency_is_lost() -> None:
    """Pins the FastAPI behaviour the async dependency relies on: a ContextVar set by a def
    dependency (run in a copied context in a thread) is not seen by the endpoint."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    app = FastAPI()

    def sync_dependency() -> None:
        var.set("sync")

    async def async_dependency() -> None:
        var.set("async")

    @app.get("/sync", dependencies=[Depends(sync_dependency)])
    async def from_sync() -> str:
        return var.get()

    @app.get("/async", dependencies=[Depends(async_dependency)])
    async def from_async() -> str:
        return var.get()

    async with client_of(app) as client:
        assert (await client.get("/sync")).json() == "unset"
        assert (await client.get("/async")).json() == "async"


async def test_endpoint_without_the_dependency_gets_outside_scope_error(
    cache: SessionCache,
) -> None:
    """cached_execute in an endpoint that opened no scope raises an error naming scope()."""
    app = FastAPI()

    @app.get("/")
    async def endpoint() -> None:
        await cached_execute(select(Item))

    async with client_of(app) as client:
        with pytest.raises(OutsideScopeError, match=re.escape("cache.scope()")):
            await client.get("/")


async def test_module_docstring_example_runs() -> None:
    """The example in async_session_cache.fastapi's docstring runs as written."""
    lines = (cache_fastapi.__doc__ or "").split("::\n", 1)[1].splitlines()
    end = next(n for n, line in enumerate(lines) if line and not line.startswith("    "))
    code = textwrap.dedent("\n".join(lines[:end]))
    assert "session_dependency(cache)" in code
    namespace: dict[str, Any] = {"__name__": "docstring_example"}
    exec(compile(code, "<docstring>", "exec"), namespace)
    engine: AsyncEngine = namespace["engine"]
    async with engine.begin() as connection:
        await connection.run_sync(namespace["Base"].metadata.create_all)
        await connection.execute(text("INSERT INTO users (id, name) VALUES (5, 'ada')"))
    try:
        transport = httpx.ASGITransport(namespace["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/users/5")).json() == {"id": 5, "name": "ada"}
    finally:
        await engine.dispose()
