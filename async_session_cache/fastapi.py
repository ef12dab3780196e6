"""FastAPI integration: one cache scope, and so one ``AsyncSession``, per request.

``session_dependency(cache)`` is an ``async def`` yield dependency: it enters ``cache.scope()``
for the request and yields the scope's session, so the endpoint and everything it awaits may
call ``cached_execute(stmt)`` with no session argument. The scope is closed and its session
removed when the request ends: after the response, after an exception, and when the request
is cancelled (a client disconnect); its connection goes back to the pool. Declare the alias
once per cache and use it everywhere::

    from typing import Annotated

    from fastapi import Depends, FastAPI
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    from async_session_cache import SessionCache, cached_execute
    from async_session_cache.fastapi import session_dependency

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

    engine = create_async_engine("sqlite+aiosqlite://")
    cache = SessionCache(async_sessionmaker(engine, expire_on_commit=False))
    SessionDep = Annotated[AsyncSession, Depends(session_dependency(cache))]
    app = FastAPI()

    @app.get("/users/{uid}")
    async def get_user(uid: int, session: SessionDep) -> dict[str, object]:
        user = (await cached_execute(select(User).where(User.id == uid))).scalar_one()
        return {"id": user.id, "name": user.name}

A literal ``Annotated[...]`` alias is what type checkers accept as a type; a factory's return
value is not, hence the one-line pattern instead of a helper that builds it.

The scope lives in a ``ContextVar``, which FastAPI propagates from async dependencies to async
endpoints but not out of the worker thread of a sync (``def``) dependency (pitfall 8); that is
why the dependency is ``async def``. Plain ``def`` dependencies may take the session (to wrap it
in a repository object, say): they only run while the request waits for them, and the
coroutines they hand back run on the event loop inside the scope. A plain ``def`` *endpoint*
that declares the session is refused with ``SyncEndpointError``: it runs in a worker thread,
where it can neither await the session nor ``cached_execute``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection

from ._cache import SessionCache, closing_needs_io
from ._exceptions import AsyncSessionCacheError

__all__ = ["SessionDependency", "SyncEndpointError", "session_dependency"]

SessionDependency = Callable[[HTTPConnection], AsyncIterator[AsyncSession]]
"""The type of what ``session_dependency`` returns: give it to ``fastapi.Depends``."""

_ATTRIBUTE = "_fastapi_session_dependency"


class SyncEndpointError(AsyncSessionCacheError, TypeError):
    """Raised when a plain ``def`` endpoint declares the request's cached session."""

    def __init__(self, endpoint: Callable[..., Any]) -> None:
        name = getattr(endpoint, "__qualname__", repr(endpoint))
        super().__init__(
            f"endpoint {name} is a plain `def` but takes the cached AsyncSession: FastAPI runs "
            "it in a worker thread, where it can neither await the session nor "
            "cached_execute(); declare it `async def`"
        )


def session_dependency(cache: SessionCache) -> SessionDependency:
    """The FastAPI dependency that opens ``cache.scope()`` per request and yields its session.

    The same function is returned for the same ``cache``, so FastAPI's per-request dependency
    cache gives every consumer of one request the same session and scope, and
    ``app.dependency_overrides[session_dependency(cache)]`` overrides it everywhere.
    """
    # Kept on the cache itself: a module-level weak map would keep the cache alive through
    # the closure, while this reference cycle is collected with the cache.
    dependency: SessionDependency | None = vars(cache).get(_ATTRIBUTE)
    if dependency is None:
        dependency = _make_dependency(cache)
        vars(cache)[_ATTRIBUTE] = dependency
    return dependency


def _make_dependency(cache: SessionCache) -> SessionDependency:
    async def cached_session(connection: HTTPConnection) -> AsyncIterator[AsyncSession]:
        _refuse_sync_endpoint(connection, cached_session)
        scope = cache.scope()
        session = await scope.__aenter__()
        try:
            yield session
        except BaseException as exc:
            if not await _exit_shielded(scope, session, exc):
                raise
        else:
            await _exit_shielded(scope, session, None)

    return cached_session


async def _exit_shielded(
    scope: AbstractAsyncContextManager[AsyncSession],
    session: AsyncSession,
    exc: BaseException | None,
) -> bool | None:
    """Leave ``scope``; what its ``__aexit__`` returns. A cancelled request (client gone)
    must still close its session and return the connection, so an exit that awaits runs
    shielded (an await in a cancelled anyio scope would be cancelled); one that cannot
    suspend needs no shield, and skips its cost on every request served from cache."""
    exc_info = (None, None, None) if exc is None else (type(exc), exc, exc.__traceback__)
    if not closing_needs_io(session):
        return await scope.__aexit__(*exc_info)
    with anyio.CancelScope(shield=True):
        suppressed = await scope.__aexit__(*exc_info)
    return suppressed


def _refuse_sync_endpoint(connection: HTTPConnection, dependency: object) -> None:
    """Raise ``SyncEndpointError`` if the route's endpoint is sync and has a parameter
    filled by ``dependency`` (router-level ``dependencies=[...]`` only open the scope)."""
    route = connection.scope.get("route")
    endpoint = getattr(route, "endpoint", None)
    if endpoint is None or _runs_on_event_loop(endpoint):
        return
    for sub in getattr(getattr(route, "dependant", None), "dependencies", ()):
        if getattr(sub, "call", None) is dependency and getattr(sub, "name", None):
            raise SyncEndpointError(endpoint)


def _runs_on_event_loop(call: Callable[..., Any]) -> bool:
    """Whether FastAPI awaits ``call`` on the event loop (else: a worker thread)."""
    while isinstance(call, functools.partial):
        call = call.func
    if inspect.isclass(call):
        return False
    if inspect.isroutine(call):
        return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
    dunder_call = getattr(call, "__call__", None)  # noqa: B004 (an instance: its method)
    return inspect.iscoroutinefunction(dunder_call) or inspect.isasyncgenfunction(dunder_call)
