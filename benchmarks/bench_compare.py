"""This project against the alternatives a user has, in one run, on one data set.

Contenders (each against uncached ``AsyncSession.execute`` measured in the same run):

- ``async_session_cache``: the local region (``await cached_execute(stmt)``, every call in one
  scope), the shared ``async_session_cache.memory`` region and the ``async_session_cache.redis``
  region (``cached_execute(stmt, region=...)``, a new scope per call); plus, for information,
  uncached ``session.execute`` inside ``cache.scope()`` (what the library adds to a query it
  does not cache);
- SQLAlchemy's dogpile recipe ported to ``AsyncSession`` (``benchmarks/recipe.py``): a
  ``FromCache`` option, a ``do_orm_execute`` listener, ``get_or_create`` of a ``FrozenResult``,
  ``merge_frozen_result(load=False)`` on a hit; on ``dogpile.cache.memory`` and on
  ``dogpile.cache.redis`` (blocking client, pickled ``FrozenResult``);
- hand-rolled caching as users write it, with aiocache (``Cache(Cache.MEMORY)``,
  ``Cache(Cache.REDIS, serializer=PickleSerializer())``) and cashews (``setup("mem://")``,
  ``setup("redis://...")``, which pickles): a hand-made key, ``await cache.get(key)``, on a
  miss ``await session.execute(stmt)``, ``.scalars().all()`` / ``.all()`` and
  ``await cache.set(key, rows)``. Their hits hand back detached ORM objects, not instances
  of the caller's session (the memory backends: the very same objects for every request).

Workloads, on a temporary aiosqlite file (5,000 users, 200,000 orders): the three queries of
DESIGN.md (1 ORM row by PK, 100 ORM rows, 1,000 Core rows) and an expensive aggregate (orders
joined to users, GROUP BY city and age bucket, 0.1-0.25 s uncached). Hits are timed as a request
sees them: a new scope (session) per call opened before the clock starts, the clock around
execute + consume, the scope closed after it stops (a second timer includes the scope); the
local region times repeats inside one scope. Statements are built before the clock. Rounds
interleave the contenders in a rotating order; figures are medians of per-call timings.

Stampede: ``--tasks`` concurrent tasks (1,000; 200 with ``--quick``), each in its own scope or
session, miss one cold key at once (an aggregate over users, ~3 ms uncached). Each contender
runs in a fresh child process (redis flushed first) that counts the SELECTs sent
(``before_cursor_execute``) and the worst event-loop lag (a task sleeping 1 ms, the longest gap
between its wake-ups). A watchdog thread in the child reports "hung" with the blocked stack if
the stampede has not finished after ``--hang-after`` seconds (the recipe's ``threading.Lock``).

Before timing, every contender's hit is checked to return the baseline's rows, compared as
plain values (ORM entities as class, identity and column values), and to send no SQL; timed
hits are re-checked for SQL. A failed check, or a stampede task that returned wrong rows, exits
with status 2. Ratios never fail the run.

    .venv/bin/python benchmarks/bench_compare.py           # default, ~2.5 minutes
    .venv/bin/python benchmarks/bench_compare.py --quick   # under a minute

Needs the ``bench`` extra (``.venv/bin/pip install -e '.[bench]'``) and redis-server (started
by the script through ``tests/services.py``; without it the redis contenders are skipped).
Raw numbers go to ``benchmarks/results/bench_compare.json``, the chart to
``benchmarks/results/bench_compare.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import recipe
from aggregate import ORDERS, orders_table, sales_by_city_and_age
from bench_local import PK, ROWS, CheckFailed, User, populate, users_table
from dogpile.cache import make_region
from sqlalchemy import case, event, func, select, text
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from async_session_cache import SessionCache, cached_execute

try:
    import matplotlib
    from aiocache import Cache as AiocacheCache
    from aiocache.serializers import PickleSerializer
    from cashews import Cache as CashewsCache
except ImportError as exc:  # pragma: no cover - a setup problem, not a result
    raise SystemExit(
        f"bench_compare needs the bench extra: .venv/bin/pip install -e '.[bench]' ({exc})"
    ) from exc

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
STAMPEDE_MARK = "STAMPEDE_RESULT "


# -- workloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A query: how to build its statement, consume its result, and key it by hand."""

    name: str
    build: Callable[[], Any]
    consume: Callable[[Any], Any]
    hand_key: str
    """The key a user writes for hand-rolled caching (aiocache, cashews)."""


def _city_stats() -> Any:
    users = users_table
    decade = ((users.c.age // 10) * 10).label("decade")
    return (
        select(
            users.c.city,
            decade,
            func.count().label("users"),
            func.sum(case((users.c.active, 1), else_=0)).label("active"),
            func.round(func.avg(func.length(users.c.email)), 3).label("email_length"),
            func.min(users.c.created_at).label("first_seen"),
        )
        .group_by(users.c.city, decade)
        .order_by(users.c.city, decade)
    )


WORKLOADS = [
    Workload(
        "1 ORM row by PK",
        lambda: select(User).where(User.id == PK),
        lambda result: result.scalar_one(),
        f"user:{PK}",
    ),
    Workload(
        "100 ORM rows",
        lambda: select(User).where(User.id <= 100),
        lambda result: result.scalars().all(),
        "users:first:100",
    ),
    Workload(
        "1000 Core rows",
        lambda: select(users_table).where(users_table.c.id <= 1000),
        lambda result: result.all(),
        "users-core:first:1000",
    ),
    Workload(
        f"join+agg {ORDERS // 1000}k",
        sales_by_city_and_age,
        lambda result: result.all(),
        "report:sales-by-city-and-age",
    ),
]
EXPENSIVE = WORKLOADS[-1]
STAMPEDE_WORKLOADS = {
    "city stats": Workload(
        "city stats", _city_stats, lambda result: result.all(), "report:city-stats"
    ),
    **{workload.name: workload for workload in WORKLOADS},
}


def plain(value: Any) -> Any:
    """A result as plain values: rows as tuples, ORM entities as (class, identity, columns)."""
    if isinstance(value, Row):
        return tuple(plain(item) for item in value)
    if hasattr(value, "_sa_instance_state"):
        state = sa_inspect(value)
        columns = tuple(getattr(value, attr.key) for attr in state.mapper.column_attrs)
        return (type(value).__name__, state.identity, columns)
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def snapshot(consumed: Any) -> Any:
    """``plain()`` of a consumed result; a single entity counts as a list of one."""
    return plain(consumed if isinstance(consumed, list | tuple) else [consumed])


def entities(consumed: Any) -> list[Any]:
    values = consumed if isinstance(consumed, list | tuple) else [consumed]
    return [value for value in values if hasattr(value, "_sa_instance_state")]


async def seed(engine: AsyncEngine) -> None:
    """``ROWS`` users (as ``bench_local.py``) and ``ORDERS`` orders generated by SQLite."""
    await populate(engine, ROWS)
    async with engine.begin() as connection:
        await connection.run_sync(orders_table.metadata.create_all)
        await connection.execute(
            text(
                "INSERT INTO orders (id, user_id, amount_cents, status) "
                "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < :n) "
                "SELECT x, 1 + (x * 7919) % :users, (x * 37) % 50000, "
                "CASE x % 4 WHEN 0 THEN 'paid' WHEN 1 THEN 'shipped' "
                "WHEN 2 THEN 'cancelled' ELSE 'refunded' END FROM g"
            ),
            {"n": ORDERS, "users": ROWS},
        )
        await connection.execute(text("ANALYZE"))


class SqlCounter:
    """Counts SELECTs sent to the database (``before_cursor_execute``)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.count = 0
        event.listen(engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip()[:6].upper() in ("SELECT", "WITH R", "WITH ("):
            self.count += 1

    def close(self) -> None:
        event.remove(self.engine.sync_engine, "before_cursor_execute", self._seen)


# -- contenders ------------------------------------------------------------------------------

Run = Callable[[AsyncSession, Workload, Any], Awaitable[Any]]


def _same(statement: Any) -> Any:
    return statement


@dataclass(eq=False)
class Contender:
    """One way of running a workload: a scope (session) factory and a call inside it."""

    name: str
    label: str
    kind: str
    """``baseline``, ``info`` (uncached, for information) or ``cache``."""
    open_scope: Callable[[], AbstractAsyncContextManager[AsyncSession]]
    run: Run
    prepare: Callable[[Any], Any] = _same
    """Applied to each statement before the clock starts (the recipe adds ``FromCache``)."""
    one_scope: bool = False
    """Every call in one scope (the local region), instead of a new scope per call."""
    store: str = ""
    """What the cache stores (for the notes)."""
    close: Callable[[], Awaitable[None]] | None = None
    stats: Callable[[], dict[str, Any]] | None = None
    hit_returns: str = ""


NEEDS_REDIS = {"asc-redis", "recipe-redis", "aiocache-redis", "cashews-redis"}
CONTENDER_NAMES = [
    "uncached",
    "uncached-asc-scope",
    "asc-local",
    "asc-memory",
    "asc-redis",
    "recipe-memory",
    "recipe-redis",
    "aiocache-memory",
    "aiocache-redis",
    "cashews-memory",
    "cashews-redis",
]
STAMPEDE_NAMES = [name for name in CONTENDER_NAMES if name.split("-")[0] != "uncached"]
STAMPEDE_NAMES.remove("asc-local")  # a scope's own cache: nothing for two requests to share
COLORS = {
    "asc-local": "#08306b",
    "asc-memory": "#2171b5",
    "asc-redis": "#6baed6",
    "recipe-memory": "#d94801",
    "recipe-redis": "#fdae6b",
    "aiocache-memory": "#238b45",
    "aiocache-redis": "#a1d99b",
    "cashews-memory": "#6a51a3",
    "cashews-redis": "#bcbddc",
}


async def _uncached(session: AsyncSession, workload: Workload, statement: Any) -> Any:
    return workload.consume(await session.execute(statement))


def _through_region(region: str) -> Run:
    async def run(session: AsyncSession, workload: Workload, statement: Any) -> Any:
        return workload.consume(await cached_execute(statement, region=region))

    return run


def _hand_rolled(cache: Any) -> Run:
    """What users write around aiocache / cashews: a hand-made key, get, else query + set."""

    async def run(session: AsyncSession, workload: Workload, statement: Any) -> Any:
        key = workload.hand_key
        rows = await cache.get(key)
        if rows is None:
            rows = workload.consume(await session.execute(statement))
            await cache.set(key, rows)
        return rows

    return run


def _asc(engine: AsyncEngine, name: str, region: str, redis_url: str | None) -> Contender:
    regions = {}
    if region == "memory":
        regions[region] = make_region().configure("async_session_cache.memory")
    elif region == "redis":
        regions[region] = make_region().configure(
            "async_session_cache.redis", arguments={"url": redis_url, "prefix": "bench_compare"}
        )
    cache = SessionCache(async_sessionmaker(engine, expire_on_commit=False), regions=regions)
    labels = {
        "local": "asc local region (one scope)",
        "memory": "asc memory region",
        "redis": "asc redis region",
    }
    stores = {
        "local": "frozen result on the scope's session",
        "memory": "column data in a versioned payload, in process (bounded LRU)",
        "redis": "column data as JSON in a versioned envelope",
    }
    stats_region = "local" if region == "local" else region
    return Contender(
        name,
        labels[region],
        "cache",
        cache.scope,
        _through_region(region),
        one_scope=region == "local",
        store=stores[region],
        close=cache.aclose,
        stats=lambda: dict(cache.stats()[stats_region]),
    )


async def make_contenders(
    engine: AsyncEngine, redis_url: str | None, names: list[str]
) -> list[Contender]:
    """The contenders called ``names`` (redis ones only when ``redis_url`` is set)."""
    plain_sessions = async_sessionmaker(engine, expire_on_commit=False)
    host, port = "127.0.0.1", 0
    if redis_url:
        parts = urlsplit(redis_url)
        host, port = parts.hostname or host, parts.port or 6379
    made: list[Contender] = []
    for name in names:
        if name in NEEDS_REDIS and not redis_url:
            continue
        if name == "uncached":
            made.append(
                Contender(
                    name, "uncached AsyncSession.execute", "baseline", plain_sessions, _uncached
                )
            )
        elif name == "uncached-asc-scope":
            scoped = SessionCache(async_sessionmaker(engine, expire_on_commit=False))
            made.append(
                Contender(name, "uncached, in cache.scope()", "info", scoped.scope, _uncached)
            )
        elif name.startswith("asc-"):
            made.append(_asc(engine, name, name.removeprefix("asc-"), redis_url))
        elif name.startswith("recipe-"):
            region = (
                recipe.memory_region()
                if name == "recipe-memory"
                else recipe.redis_region(host, port)
            )
            sessions = recipe.caching_sessionmaker(engine, recipe.ORMCache({"default": region}))
            made.append(
                Contender(
                    name,
                    "recipe + dogpile " + name.removeprefix("recipe-"),
                    "cache",
                    sessions,
                    _uncached,
                    prepare=lambda statement: statement.options(recipe.FromCache("default")),
                    store=(
                        "FrozenResult objects, in process"
                        if name == "recipe-memory"
                        else "pickled FrozenResult (ORM instances included), blocking client"
                    ),
                )
            )
        elif name == "aiocache-memory":
            cache: Any = AiocacheCache(AiocacheCache.MEMORY)
            made.append(
                Contender(
                    name,
                    "aiocache memory (shared objs)",
                    "cache",
                    plain_sessions,
                    _hand_rolled(cache),
                    store="the consumed objects by reference (default NullSerializer)",
                    close=cache.close,
                )
            )
        elif name == "aiocache-redis":
            cache = AiocacheCache(
                AiocacheCache.REDIS,
                endpoint=host,
                port=port,
                namespace="bench_compare",
                serializer=PickleSerializer(),
            )
            made.append(
                Contender(
                    name,
                    "aiocache redis (pickle)",
                    "cache",
                    plain_sessions,
                    _hand_rolled(cache),
                    store="pickled consumed objects (PickleSerializer; the default JSON fails)",
                    close=cache.close,
                )
            )
        elif name.startswith("cashews-"):
            cache = CashewsCache()
            cache.setup("mem://" if name == "cashews-memory" else str(redis_url))
            made.append(
                Contender(
                    name,
                    (
                        "cashews mem:// (shared objs)"
                        if name == "cashews-memory"
                        else "cashews redis:// (pickle)"
                    ),
                    "cache",
                    plain_sessions,
                    _hand_rolled(cache),
                    store=(
                        "the consumed objects (a shallow copy of the list)"
                        if name == "cashews-memory"
                        else "pickled consumed objects (cashews' default for redis)"
                    ),
                    close=cache.close,
                )
            )
        else:
            raise ValueError(f"unknown contender {name!r}")
    return made


# -- correctness -----------------------------------------------------------------------------


def _describe_hit(first: Any, second: Any, session_of_second: AsyncSession) -> str:
    a, b = entities(first), entities(second)
    if not b:
        return ""
    if all(entity in session_of_second for entity in b):
        return "entities attached to the caller's session"
    if any(x is y for x, y in zip(a, b, strict=True)):
        return "the same detached instances for every request (shared, by reference)"
    return "detached copies (unpickled), not in the caller's session"


async def check_hits(contenders: list[Contender], sql: SqlCounter) -> dict[str, Any]:
    """Warm every entry; check each hit equals the uncached baseline and sends no SQL."""
    baseline_of = contenders[0]
    assert baseline_of.kind == "baseline"
    baselines = {}
    for workload in WORKLOADS:
        async with baseline_of.open_scope() as session:
            baselines[workload.name] = snapshot(
                await baseline_of.run(session, workload, workload.build())
            )
        for contender in contenders[1:]:
            label = f"{workload.name} / {contender.label}"

            async def call(
                session: AsyncSession, c: Contender = contender, w: Workload = workload
            ) -> Any:
                return await c.run(session, w, c.prepare(w.build()))

            try:
                if contender.kind != "cache":
                    async with contender.open_scope() as session:
                        got = snapshot(await call(session))
                    if got != baselines[workload.name]:
                        raise CheckFailed(f"{label}: the rows differ from the baseline")
                    continue
                if contender.one_scope:
                    async with contender.open_scope() as session:
                        await call(session)  # the miss that fills the scope's cache
                        before = sql.count
                        first = await call(session)
                        hit = snapshot(first)
                        sent = sql.count - before
                        second = await call(session)
                        returns = _describe_hit(first, second, session)
                else:
                    async with contender.open_scope() as session:
                        await call(session)  # warm: the miss that fills the entry
                    async with contender.open_scope() as session:
                        before = sql.count
                        first = await call(session)
                        hit = snapshot(first)
                        sent = sql.count - before
                    async with contender.open_scope() as session:
                        second = await call(session)
                        returns = _describe_hit(first, second, session)
            except CheckFailed:
                raise
            except Exception as exc:
                raise CheckFailed(f"{label}: the call failed: {exc!r}") from exc
            if sent:
                raise CheckFailed(f"{label}: a cache hit sent {sent} SELECT(s)")
            if hit != baselines[workload.name]:
                raise CheckFailed(f"{label}: the hit differs from the uncached baseline")
            if returns and not contender.hit_returns:
                contender.hit_returns = returns
    return {name: len(rows) for name, rows in baselines.items()}


# -- timing ----------------------------------------------------------------------------------


async def time_batch(
    contender: Contender,
    workload: Workload,
    n: int,
    keep_gc: bool,
    execute_ns: list[int],
    scope_ns: list[int],
    sql: SqlCounter,
) -> int:
    """Time ``n`` calls; return the SELECTs they sent. Results are held until the batch is
    over, so dropping them is never inside a timer."""
    clock = time.perf_counter_ns
    build, prepare, run = workload.build, contender.prepare, contender.run
    statements = [prepare(build()) for _ in range(n + 1)]
    held: list[Any] = []
    gc.collect()
    if not keep_gc:
        gc.disable()
    try:
        if contender.one_scope:
            async with contender.open_scope() as session:
                held.append(await run(session, workload, statements.pop()))  # fills the scope
                before = sql.count
                for statement in statements[:n]:
                    t1 = clock()
                    kept = await run(session, workload, statement)
                    t2 = clock()
                    held.append(kept)
                    execute_ns.append(t2 - t1)
                sent = sql.count - before
        else:
            if workload is not EXPENSIVE or contender.kind == "cache":
                async with contender.open_scope() as session:  # untimed warm-up
                    held.append(await run(session, workload, statements.pop()))
            before = sql.count
            for statement in statements[:n]:
                t0 = clock()
                async with contender.open_scope() as session:
                    t1 = clock()
                    kept = await run(session, workload, statement)
                    t2 = clock()
                t3 = clock()
                held.append(kept)
                execute_ns.append(t2 - t1)
                scope_ns.append(t3 - t0)
            sent = sql.count - before
    finally:
        gc.enable()
    held.clear()
    return sent


async def run_hits(args: argparse.Namespace, db: Path, redis_url: str | None) -> dict[str, Any]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
    sql = SqlCounter(engine)
    contenders = await make_contenders(engine, redis_url, args.contenders)
    try:
        started = time.perf_counter()
        rows = await check_hits(contenders, sql)
        checked = time.perf_counter() - started
        samples: dict[str, dict[str, list[int]]] = {
            f"{workload.name}/{contender.name}": {"execute": [], "scope": []}
            for workload in WORKLOADS
            for contender in contenders
        }
        started = time.perf_counter()
        for number in range(args.rounds):
            shift = number % len(contenders)
            order = contenders[shift:] + contenders[:shift]  # rotate who goes first
            for workload in WORKLOADS:
                for contender in order:
                    reps = args.reps
                    if workload is EXPENSIVE and contender.kind != "cache":
                        reps = args.expensive_reps
                    cell = samples[f"{workload.name}/{contender.name}"]
                    sent = await time_batch(
                        contender,
                        workload,
                        max(1, reps // args.rounds),
                        args.keep_gc,
                        cell["execute"],
                        cell["scope"],
                        sql,
                    )
                    if contender.kind == "cache" and sent:
                        raise CheckFailed(
                            f"{workload.name} / {contender.label}: timed hits sent {sent} SELECTs"
                        )
        timed = time.perf_counter() - started
        stats = {c.name: c.stats() for c in contenders if c.stats is not None}
    finally:
        sql.close()
        for contender in contenders:
            if contender.close is not None:
                await contender.close()
        await engine.dispose()
    return {
        "contenders": [
            {
                "name": c.name,
                "label": c.label,
                "kind": c.kind,
                "stores": c.store,
                "hit_returns": c.hit_returns,
                "one_scope": c.one_scope,
            }
            for c in contenders
        ],
        "result_rows": rows,
        "check_s": round(checked, 2),
        "timing_s": round(timed, 2),
        "stats": stats,
        "samples_ns": samples,
    }


def _us(samples: list[int], quantile: float = 0.5) -> float:
    if quantile == 0.5:
        return statistics.median(samples) / 1000
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))] / 1000


def summarize(hits: dict[str, Any]) -> list[dict[str, Any]]:
    """Medians, p99 and ratios against the baseline, per workload and contender."""
    rows = []
    for workload in WORKLOADS:
        base = hits["samples_ns"][f"{workload.name}/uncached"]
        base_exec, base_scope = _us(base["execute"]), _us(base["scope"])
        for contender in hits["contenders"]:
            cell = hits["samples_ns"][f"{workload.name}/{contender['name']}"]
            execute = _us(cell["execute"])
            row: dict[str, Any] = {
                "workload": workload.name,
                "contender": contender["name"],
                "label": contender["label"],
                "calls": len(cell["execute"]),
                "median_us": round(execute, 2),
                "p99_us": round(_us(cell["execute"], 0.99), 2),
                "speedup": round(base_exec / execute, 2),
            }
            if cell["scope"]:
                scope = _us(cell["scope"])
                row["with_scope_median_us"] = round(scope, 2)
                row["with_scope_speedup"] = round(base_scope / scope, 2)
            rows.append(row)
    return rows


# -- stampede --------------------------------------------------------------------------------


@dataclass
class StampedeState:
    completed: int = 0
    last_start: float = 0.0
    max_gap_end: float = 0.0
    last_tick: float = field(default_factory=time.perf_counter)
    max_gap: float = 0.0
    gaps: list[float] = field(default_factory=list)


async def ticker(stop: asyncio.Event, state: StampedeState) -> None:
    """Sleep 1 ms at a time and record the gaps between wake-ups (the event-loop lag)."""
    clock = time.perf_counter
    state.last_tick = last = clock()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = clock()
        state.gaps.append(now - last)
        if now - last > state.max_gap:
            state.max_gap, state.max_gap_end = now - last, now
        state.last_tick = last = now


def _watchdog(state: StampedeState, sql: SqlCounter, after: float, main: int) -> None:
    """Runs in a thread: the stampede has not finished; report where the loop is stuck."""
    frame = sys._current_frames().get(main)
    stack = [
        f"{Path(entry.filename).name}:{entry.lineno} {entry.name}: {entry.line}"
        for entry in (traceback.extract_stack(frame)[-7:] if frame is not None else [])
    ]
    report = {
        "hung": True,
        "hang_after_s": after,
        "queries": sql.count,
        "completed": state.completed,
        "loop_stalled_s": round(time.perf_counter() - state.last_tick, 2),
        "max_gap_ms": round(state.max_gap * 1000, 2),
        "main_thread_stack": stack,
    }
    print(STAMPEDE_MARK + json.dumps(report), flush=True)
    os._exit(0)  # the event loop cannot be stopped from here: it is blocked


async def stampede(args: argparse.Namespace) -> dict[str, Any]:
    """In a child process: ``args.tasks`` tasks miss one cold key of one contender at once."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{args.db}")
    workload = STAMPEDE_WORKLOADS[args.stampede_query]
    (contender,) = await make_contenders(engine, args.redis_url, [args.stampede_child])
    async with async_sessionmaker(engine, expire_on_commit=False)() as session:
        expected = snapshot(workload.consume(await session.execute(workload.build())))
        runs = []
        for _ in range(5):  # compiled and cached by now: what one uncached query costs
            began = time.perf_counter()
            workload.consume(await session.execute(workload.build()))
            runs.append(time.perf_counter() - began)
        uncached_ms = statistics.median(runs) * 1000
    sql = SqlCounter(engine)
    state = StampedeState()
    watchdog = threading.Timer(
        args.hang_after, _watchdog, (state, sql, args.hang_after, threading.get_ident())
    )
    watchdog.daemon = True
    statements = [contender.prepare(workload.build()) for _ in range(args.tasks)]

    async def one(statement: Any) -> Any:
        state.last_start = time.perf_counter()
        async with contender.open_scope() as session:
            got = snapshot(await contender.run(session, workload, statement))
        state.completed += 1
        return got

    stop = asyncio.Event()
    ticking = asyncio.create_task(ticker(stop, state))
    await asyncio.sleep(0.02)  # the ticker's first gaps are not the stampede's
    state.gaps.clear()
    state.max_gap = 0.0
    watchdog.start()
    cpu = time.process_time()
    began = time.perf_counter()
    outcomes = await asyncio.gather(*(one(s) for s in statements), return_exceptions=True)
    wall = time.perf_counter() - began
    cpu = time.process_time() - cpu
    watchdog.cancel()
    stop.set()
    await ticking
    sql.close()
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    errors = [f"{type(o).__name__}: {o}" for o in failures]
    gaps = sorted(state.gaps)
    result = {
        "hung": False,
        "tasks": args.tasks,
        "workload": workload.name,
        "uncached_ms": round(uncached_ms, 2),
        "queries": sql.count,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "max_gap_ms": round(state.max_gap * 1000, 2),
        "max_lag_ms": round(max(0.0, state.max_gap - 0.001) * 1000, 2),
        "max_gap_ended_at_ms": round((state.max_gap_end - began) * 1000, 1),
        "last_task_started_at_ms": round((state.last_start - began) * 1000, 1),
        "p99_gap_ms": round(gaps[int(0.99 * (len(gaps) - 1))] * 1000, 2) if gaps else None,
        "errors": len(errors),
        "error_kinds": sorted({type(o).__name__ for o in failures}),
        "first_error": errors[0][:300] if errors else None,
        "wrong_rows": sum(
            1 for o in outcomes if not isinstance(o, BaseException) and o != expected
        ),
        "correct": sum(1 for o in outcomes if not isinstance(o, BaseException) and o == expected),
    }
    if contender.stats is not None:
        result["region_stats"] = contender.stats()
    if contender.close is not None:
        await contender.close()
    await engine.dispose()
    return result


def _flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()


def run_stampedes(
    args: argparse.Namespace, db: Path, redis_url: str | None
) -> list[dict[str, Any]]:
    """Each stampede contender in a fresh child process, one after the other."""
    results = []
    for name in [n for n in STAMPEDE_NAMES if n in args.contenders]:
        if name in NEEDS_REDIS and not redis_url:
            continue
        if redis_url:
            _flush_redis(redis_url)  # the key is cold for every contender
        argv = [sys.executable, __file__, "--stampede-child", name, "--db", str(db)]
        argv += ["--tasks", str(args.tasks), "--hang-after", str(args.hang_after)]
        argv += ["--stampede-query", args.stampede_query]
        if redis_url:
            argv += ["--redis-url", redis_url]
        began = time.perf_counter()
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=args.hang_after + 60, check=False
            )
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith(STAMPEDE_MARK)]
            if lines:
                result = json.loads(lines[-1][len(STAMPEDE_MARK) :])
            else:
                result = {"failed": f"exit {done.returncode}: {done.stderr[-800:]}"}
        except subprocess.TimeoutExpired:
            result = {"hung": True, "hang_after_s": args.hang_after + 60, "killed": True}
        result["contender"] = name
        result["process_s"] = round(time.perf_counter() - began, 1)
        results.append(result)
        print(f"  stampede {name:<16} {_stampede_summary(result)}", flush=True)
    return results


def _stampede_summary(result: dict[str, Any]) -> str:
    if "failed" in result:
        return "FAILED: " + result["failed"].strip().splitlines()[-1]
    if result.get("hung"):
        return (
            f"hung > {result['hang_after_s']:g} s (event loop stalled "
            f"{result.get('loop_stalled_s', '?')} s; {result.get('queries', '?')} queries, "
            f"{result.get('completed', '?')} tasks done)"
        )
    text_ = (
        f"{result['queries']:>5} queries, max loop lag {result['max_lag_ms']:>8.1f} ms, "
        f"{result['wall_s']:.2f} s, {result['correct']}/{result['tasks']} correct"
    )
    if result["errors"]:
        text_ += f", {result['errors']} errors {result['error_kinds']}"
    return text_


# -- report ----------------------------------------------------------------------------------


def print_tables(summary: list[dict[str, Any]], hits: dict[str, Any]) -> None:
    labels = {c["name"]: c["label"] for c in hits["contenders"]}
    by_key = {(row["workload"], row["contender"]): row for row in summary}
    for timer, title in (
        ("median_us", "execute + consume timed, scope opened before and closed after the clock"),
        ("with_scope_median_us", "scope open and close included"),
    ):
        speed = "speedup" if timer == "median_us" else "with_scope_speedup"
        print(f"\nmedian us per call (speedup vs uncached): {title}")
        header = f"{'contender':<30}" + "".join(f" | {w.name:>20}" for w in WORKLOADS)
        print(header)
        print("-" * len(header))
        for name, label in labels.items():
            cells = []
            for workload in WORKLOADS:
                row = by_key[(workload.name, name)]
                if timer not in row:
                    cells.append(f"{'(one scope)':>20}")
                    continue
                cells.append(f"{row[timer]:>10.1f} ({row[speed]:>6.1f}x)")
            print(f"{label:<30}" + "".join(f" | {cell}" for cell in cells))


def print_notes(hits: dict[str, Any]) -> None:
    print("\nwhat each cache stores, and what a hit of an ORM query hands back:")
    for c in hits["contenders"]:
        if c["kind"] == "cache":
            print(f"  {c['label']:<30} stores {c['stores']}; returns {c['hit_returns']}")


def print_stampede(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if not results:
        return
    first = next((r for r in results if "uncached_ms" in r), None)
    cost = f", ~{first['uncached_ms']:.1f} ms uncached" if first else ""
    print(
        f"\nstampede: {args.tasks} tasks, each in its own scope/session, miss one cold key "
        f"({args.stampede_query!r}{cost}) at once; fresh process each"
    )
    header = (
        f"{'contender':<30} | {'SELECTs':>7} | {'max lag ms':>10} | {'started ms':>10} | "
        f"{'wall s':>6} | {'cpu s':>5} | {'correct':>7} | notes"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        label = r.get("label", r["contender"])
        if "failed" in r:
            print(f"{label:<30} | {'-':>7} | {'-':>10} | {'-':>10} | {'-':>6} | {'-':>5} | failed")
        elif r.get("hung"):
            stalled = f"> {r.get('loop_stalled_s', r['hang_after_s']) * 1000:,.0f}"
            print(
                f"{label:<30} | {r.get('queries', '?'):>7} | {stalled:>10} | {'-':>10} | "
                f"{'> ' + format(r['hang_after_s'], 'g'):>6} | {'-':>5} | "
                f"{r.get('completed', 0):>7} | HUNG: no task finished in {r['hang_after_s']:g} s"
            )
        else:
            notes = []
            if r["errors"]:
                notes.append(f"{r['errors']} tasks failed ({', '.join(r['error_kinds'])})")
            stats = r.get("region_stats")
            if stats:
                notes.append(
                    f"misses {stats.get('misses')}, coalesced {stats.get('coalesced')}, "
                    f"errors {stats.get('errors')}"
                )
            print(
                f"{label:<30} | {r['queries']:>7} | {r['max_lag_ms']:>10.1f} | "
                f"{r['last_task_started_at_ms']:>10.1f} | {r['wall_s']:>6.2f} | "
                f"{r['cpu_s']:>5.2f} | {r['correct']:>7} | {'; '.join(notes)}"
            )
    print(
        "max lag: longest gap between wake-ups of a 1 ms ticker, minus 1 ms; started: when the "
        "last task\nstarted running (the start-up burst); cpu: this process's CPU time"
    )
    for r in results:
        if r.get("hung") and r.get("main_thread_stack"):
            print(f"\n{r.get('label', r['contender'])}: the event loop's thread was blocked in")
            for line in r["main_thread_stack"][-6:]:
                print(f"    {line}")


def draw_chart(
    path: Path,
    summary: list[dict[str, Any]],
    hits: dict[str, Any],
    stampede_results: list[dict[str, Any]],
    args: argparse.Namespace,
) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cached = [c for c in hits["contenders"] if c["kind"] == "cache"]
    by_key = {(row["workload"], row["contender"]): row for row in summary}
    fig = plt.figure(figsize=(16, 11), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[3.2, 2])
    ax = fig.add_subplot(grid[0, :])
    width = 0.84 / len(cached)
    for i, contender in enumerate(cached):
        xs = [j + (i - (len(cached) - 1) / 2) * width for j in range(len(WORKLOADS))]
        ys = [by_key[(w.name, contender["name"])]["speedup"] for w in WORKLOADS]
        ax.bar(xs, ys, width, label=contender["label"], color=COLORS[contender["name"]])
        for x, y in zip(xs, ys, strict=True):
            ax.text(
                x,
                y * 1.08,
                f"{y:.0f}x" if y >= 10 else f"{y:.1f}x",
                ha="center",
                va="bottom",
                fontsize=7.5,
                rotation=90,
            )
    ax.set_yscale("log")
    ax.axhline(1, color="black", linewidth=0.9)
    ax.text(len(WORKLOADS) - 0.5, 1.04, "uncached", ha="right", va="bottom", fontsize=8)
    ticks = [
        f"{w.name}\n(uncached {by_key[(w.name, 'uncached')]['median_us']:,.0f} us)"
        for w in WORKLOADS
    ]
    ax.set_xticks(range(len(WORKLOADS)), ticks, fontsize=10)
    top = max(by_key[(w.name, c["name"])]["speedup"] for w in WORKLOADS for c in cached)
    bottom = min(by_key[(w.name, c["name"])]["speedup"] for w in WORKLOADS for c in cached)
    ax.set_ylim(min(0.5, bottom / 1.5), top * 6)
    ax.set_ylabel("speedup vs uncached AsyncSession.execute\n(median per call, log scale)")
    ax.set_title(
        "Cache hits, new scope/session per call (asc local: repeats inside one scope); "
        f"aiosqlite, {ROWS:,} users, {ORDERS:,} orders; {hits['mode']} mode",
        fontsize=11,
    )
    ax.legend(ncol=3, fontsize=9, loc="upper left")
    ax.text(
        0.005,
        0.8,
        "asc and the recipe return entities attached to the caller's session;\n"
        "aiocache/cashews hits return detached objects (memory backends: the same\n"
        "instances for every request, 'shared objs'; redis backends: unpickled copies)",
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize=8.5,
        bbox={"facecolor": "white", "edgecolor": "0.8", "alpha": 0.9},
    )
    ax.grid(axis="y", which="both", alpha=0.25)

    if not stampede_results:
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    labels = [r.get("label", r["contender"]) for r in stampede_results]
    colors = [COLORS.get(r["contender"], "grey") for r in stampede_results]
    ys = list(range(len(stampede_results)))[::-1]
    hang_ms = args.hang_after * 1000
    ax_q = fig.add_subplot(grid[1, 0])
    ax_l = fig.add_subplot(grid[1, 1])
    for y, r, color in zip(ys, stampede_results, colors, strict=True):
        hung = bool(r.get("hung")) or "failed" in r
        queries = max(r.get("queries", 0) or 0, 0)
        lag = hang_ms if hung else r.get("max_lag_ms", 0)
        hatch = "//" if hung else None
        ax_q.barh(y, max(queries, 0.8), color=color, hatch=hatch, edgecolor="black")
        ax_l.barh(y, max(lag, 0.1), color=color, hatch=hatch, edgecolor="black")
        if "failed" in r:
            q_text, l_text = "failed", "failed"
        elif hung:
            q_text = f"{queries} sent, then hung (> {r['hang_after_s']:g} s)"
            l_text = f"loop frozen > {r.get('loop_stalled_s', r['hang_after_s']):.0f} s"
        else:
            q_text = f"{queries}"
            if r.get("errors"):
                q_text += f"  ({r['errors']} tasks failed: {', '.join(r['error_kinds'])})"
            region_errors = (r.get("region_stats") or {}).get("errors")
            if region_errors:
                q_text += f"  ({region_errors} redis errors counted: region declared down)"
            l_text = f"{lag:,.1f} ms"
        ax_q.text(max(queries, 0.8) * 1.1, y, q_text, va="center", fontsize=8.5)
        ax_l.text(max(lag, 0.1) * 1.1, y, l_text, va="center", fontsize=8.5)
    for axis in (ax_q, ax_l):
        axis.set_xscale("log")
        axis.set_yticks(ys, labels, fontsize=9)
        axis.grid(axis="x", which="major", alpha=0.25)
    ax_q.set_xlim(0.5, args.tasks * 20)
    ax_l.set_xlim(0.1, hang_ms * 30)
    ax_q.set_xlabel(f"SELECTs sent ({args.tasks} tasks missing one cold key; 1 is ideal)")
    ax_l.set_xlabel("worst event-loop lag, ms (log)")
    ax_q.set_title(f"Stampede: queries executed ({args.stampede_query!r})", fontsize=11)
    ax_l.set_title("Stampede: worst event-loop lag (1 ms ticker)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, small stampede")
    parser.add_argument("--reps", type=int, help="timed calls per workload and contender")
    parser.add_argument("--expensive-reps", type=int, help="uncached calls of the join+agg query")
    parser.add_argument("--rounds", type=int, help="interleaved rounds the reps are split into")
    parser.add_argument("--tasks", type=int, help="concurrent tasks of the stampede")
    parser.add_argument("--hang-after", type=float, help="seconds before a stampede is 'hung'")
    parser.add_argument(
        "--stampede-query",
        default="city stats",
        choices=sorted(STAMPEDE_WORKLOADS),
        help="the cold key the stampede misses",
    )
    parser.add_argument(
        "--only",
        dest="contenders",
        type=lambda s: s.split(","),
        default=CONTENDER_NAMES,
        help="comma-separated contenders (the baseline is always run): "
        + ",".join(CONTENDER_NAMES),
    )
    parser.add_argument("--skip-stampede", action="store_true", help="hits only")
    parser.add_argument(
        "--replot", action="store_true", help="redraw the chart from --output's JSON; run nothing"
    )
    parser.add_argument("--keep-gc", action="store_true", help="leave gc enabled while timing")
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_compare.json")
    parser.add_argument("--chart", type=Path, default=RESULTS / "bench_compare.png")
    # the child process of one stampede (internal)
    parser.add_argument("--stampede-child", help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 10)
    args.reps = max(args.rounds, args.reps or (30 if args.quick else 400))
    args.expensive_reps = max(args.rounds, args.expensive_reps or (6 if args.quick else 40))
    args.tasks = args.tasks or (200 if args.quick else 1000)
    args.hang_after = args.hang_after or (5.0 if args.quick else 10.0)
    unknown = set(args.contenders) - set(CONTENDER_NAMES)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    args.contenders = ["uncached", *(n for n in CONTENDER_NAMES[1:] if n in args.contenders)]
    return args


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("SQLAlchemy", "aiosqlite", "dogpile.cache", "aiocache", "cashews", "redis"):
        found[name] = metadata.version(name)
    found["matplotlib"] = matplotlib.__version__
    return found


def run(args: argparse.Namespace) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.services import ServiceUnavailable, run_redis

    mode = "quick" if args.quick else "default"
    print(
        f"bench_compare ({mode}): "
        + ", ".join(f"{name} {version}" for name, version in versions().items())
    )
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_compare-") as tmp:
        db = Path(tmp, "bench.db")
        asyncio.run(_seed_file(db))
        seeded = time.perf_counter() - began
        try:
            with run_redis() as server:
                return _run_with(args, mode, db, server.url, seeded)
        except ServiceUnavailable as exc:
            print(f"redis contenders skipped: {exc}", file=sys.stderr)
            return _run_with(args, mode, db, None, seeded)


async def _seed_file(db: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
    try:
        await seed(engine)
    finally:
        await engine.dispose()


def _run_with(
    args: argparse.Namespace, mode: str, db: Path, redis_url: str | None, seeded: float
) -> int:
    print(
        f"seeded {ROWS:,} users and {ORDERS:,} orders in {seeded:.1f} s; {args.reps} timed "
        f"calls per cell ({args.expensive_reps} uncached join+agg) in {args.rounds} rounds"
        + ("" if args.keep_gc else "; gc disabled while timing")
    )
    if redis_url:
        _flush_redis(redis_url)
    hits = asyncio.run(run_hits(args, db, redis_url))
    hits["mode"] = mode
    print(f"checked every hit in {hits['check_s']} s; timing took {hits['timing_s']} s")
    summary = summarize(hits)
    print_tables(summary, hits)
    print_notes(hits)
    stampede_results: list[dict[str, Any]] = []
    if not args.skip_stampede:
        print(f"\nstampede runs ({args.tasks} tasks, hung after {args.hang_after:g} s):")
        stampede_results = run_stampedes(args, db, redis_url)
        labels = {c["name"]: c["label"] for c in hits["contenders"]}
        for result in stampede_results:
            result["label"] = labels.get(result["contender"], result["contender"])
        print_stampede(stampede_results, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "mode": mode,
                "reps": args.reps,
                "expensive_reps": args.expensive_reps,
                "rounds": args.rounds,
                "gc_disabled": not args.keep_gc,
                "users": ROWS,
                "orders": ORDERS,
                "versions": versions(),
                "redis": bool(redis_url),
                "results": summary,
                "contenders": hits["contenders"],
                "result_rows": hits["result_rows"],
                "region_stats": hits["stats"],
                "stampede": {
                    "tasks": args.tasks,
                    "workload": args.stampede_query,
                    "hang_after_s": args.hang_after,
                    "results": stampede_results,
                },
                "samples_ns": hits["samples_ns"],
            },
            indent=1,
            default=str,
        )
    )
    draw_chart(args.chart, summary, hits, stampede_results, args)
    print(f"\nraw numbers: {args.output}\nchart: {args.chart}")
    wrong = [r for r in stampede_results if r.get("wrong_rows")]
    if wrong:
        names = ", ".join(r["contender"] for r in wrong)
        print(f"correctness check failed: stampede tasks got wrong rows ({names})", file=sys.stderr)
        return 2
    return 0


def replot(args: argparse.Namespace) -> int:
    """Redraw the chart from a saved JSON file."""
    saved = json.loads(args.output.read_text())
    stampede_saved = saved["stampede"]
    args.tasks = stampede_saved["tasks"]
    args.hang_after = stampede_saved["hang_after_s"]
    args.stampede_query = stampede_saved["workload"]
    hits = {"contenders": saved["contenders"], "mode": saved["mode"]}
    draw_chart(args.chart, saved["results"], hits, stampede_saved["results"], args)
    print(f"chart: {args.chart}")
    return 0


def main() -> int:
    args = parse_args()
    if args.replot:
        return replot(args)
    if args.stampede_child:
        result = asyncio.run(stampede(args))
        print(STAMPEDE_MARK + json.dumps(result, default=str), flush=True)
        return 0
    try:
        return run(args)
    except CheckFailed as exc:
        print(f"correctness check failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
