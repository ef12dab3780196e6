"""Shared-region hits against uncached ``AsyncSession.execute``: memory on aiosqlite, redis on
PostgreSQL.

A shared-region hit is realistic only in a new scope (a new request): its session starts with
an empty identity map and the cached entities must be rebuilt in it. So every timed call runs
in a fresh ``async with cache.scope()``, uncached (``await session.execute(stmt)``) and cached
(``await cached_execute(stmt, region=...)``) alike, and two timers are kept per call:

- ``execute`` (the gated one): from just before the awaited call to just after the result is
  consumed (``scalar_one()``, ``scalars().all()``, ``all()``), the scope already open; for the
  uncached path it includes the pool checkout the first ``execute`` of a session does;
- ``scope``: the same call with the scope's open and close included (session creation, store
  attachment, ``close()``/``remove()``, connection release).

The consumed result is kept alive until the scope has closed and both clocks have stopped, so
neither path pays for dropping its objects inside the timer.

Part A, the shared ``async_session_cache.memory`` region against uncached aiosqlite (a temp
file of 5,000 users, the three queries of DESIGN.md): statement variants as in
``bench_local.py`` (``prebuilt``, the gated one; ``fresh``; ``reused``), each also timed with
many calls sharing one scope (``session`` rows, for information: the entities are then
already in the identity map). Default mode gates the ``request``/``execute``/``prebuilt``
ratios: 12x for 1 ORM row, 2.5x for 100 ORM rows, 40x for 1,000 Core rows (exit 1).

Part B, the ``async_session_cache.redis`` region (a throwaway redis-server) against uncached
PostgreSQL through asyncpg (a throwaway server, loopback): the same three queries plus a join
of 200,000 orders with the users, grouped by city and age bucket (SUM, COUNT, AVG, ORDER BY,
LIMIT 20). Prebuilt statements only; p50 and p99 are reported, nothing is gated.

Before timing, each hit (in a new scope, then again in the same scope) is checked to return
the baseline's rows, with ORM entities attached to the caller's session, and to emit no SQL;
timed hits are re-checked to emit no SQL. A failed check exits with status 2. Baseline and
cached batches are interleaved, alternating which goes first.

    .venv/bin/python benchmarks/bench_shared.py               # both parts; gate part A
    .venv/bin/python benchmarks/bench_shared.py --quick       # CI: well under a minute, no gate
    .venv/bin/python benchmarks/bench_shared.py --part A --profile   # where a memory hit goes

Raw samples go to ``benchmarks/results/bench_shared.json``. The models and the three queries
are imported from ``bench_local.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import dogpile
import sqlalchemy
from aggregate import ORDERS, orders_table, sales_by_city_and_age
from bench_local import (
    GATED_VARIANT,
    QUERIES,
    ROWS,
    VARIANTS,
    CheckFailed,
    Query,
    populate,
)
from dogpile.cache import make_region
from machine import OtherLoad
from sqlalchemy import (
    event,
    text,
)
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from async_session_cache import SessionCache, cached_execute

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "bench_shared.json"
TARGETS = {"1 ORM row by PK": 12.0, "100 ORM rows": 2.5, "1000 Core rows": 40.0}
"""Part A gate: uncached / memory-hit median ratio, request scope, execute timer, prebuilt."""
PATHS = ("uncached", "cached")
SCOPES = ("request", "session")
"""``request``: a new scope per call (gated); ``session``: one scope for a whole batch."""
GATED_SCOPE = "request"


EXPENSIVE = Query(
    f"join+agg {ORDERS // 1000}k",
    sales_by_city_and_age,
    lambda result: result.all(),
    lambda rows: [tuple(row) for row in rows],
)
PART_B_QUERIES = [*QUERIES, EXPENSIVE]
PART_B_VARIANT = "prebuilt"

Call = Callable[[AsyncSession], Awaitable[Any]]


# -- calls and timing ------------------------------------------------------------------------


def make_call(query: Query, variant: str, path: str, region: str) -> Call:
    """What one timed call runs in a session: build (or reuse), execute, consume."""
    build, consume = query.build, query.consume
    if path == "uncached":

        def execute(session: AsyncSession, statement: Any) -> Awaitable[Any]:
            return session.execute(statement)

    else:

        def execute(session: AsyncSession, statement: Any) -> Awaitable[Any]:
            return cached_execute(statement, region=region)

    if variant == "fresh":

        async def call(session: AsyncSession) -> Any:
            return consume(await execute(session, build()))

    elif variant == "prebuilt":
        statements: list[Any] = []

        async def call(session: AsyncSession) -> Any:
            return consume(await execute(session, statements.pop() if statements else build()))

        call.prepare = lambda n: statements.extend(build() for _ in range(n))  # type: ignore[attr-defined]

    else:
        statement = build()

        async def call(session: AsyncSession) -> Any:
            return consume(await execute(session, statement))

    return call


async def time_batch(
    cache: SessionCache,
    call: Call,
    n: int,
    scope: str,
    keep_gc: bool,
    execute_ns: list[int],
    scope_ns: list[int] | None,
) -> None:
    """Time ``n`` calls; ``request``: each in a new scope, ``session``: all in one scope.

    Results are held until the batch is over, so dropping them (and their instances) is
    never inside a timer.
    """
    clock = time.perf_counter_ns
    prepare = getattr(call, "prepare", None)
    if prepare is not None:
        prepare(n + 1)  # statements for the timed calls, built before the clock starts
    held: list[Any] = []
    gc.collect()
    if not keep_gc:
        gc.disable()
    try:
        if scope == "request":
            assert scope_ns is not None
            for _ in range(n):
                t0 = clock()
                async with cache.scope() as session:
                    t1 = clock()
                    kept = await call(session)
                    t2 = clock()
                t3 = clock()
                held.append(kept)
                execute_ns.append(t2 - t1)
                scope_ns.append(t3 - t0)
        else:
            async with cache.scope() as session:
                held.append(await call(session))  # untimed: the first call of the session
                for _ in range(n):
                    t1 = clock()
                    kept = await call(session)
                    t2 = clock()
                    held.append(kept)
                    execute_ns.append(t2 - t1)
    finally:
        gc.enable()
    held.clear()


def _entities(consumed: Any) -> list[Any]:
    values = consumed if isinstance(consumed, Sequence) else [consumed]
    return [value for value in values if hasattr(value, "_sa_instance_state")]


class SqlCounter:
    """Counts statements sent to the database (``before_cursor_execute``)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.count = 0
        event.listen(engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, *_: Any) -> None:
        self.count += 1

    def close(self) -> None:
        event.remove(self.engine.sync_engine, "before_cursor_execute", self._seen)


async def _checked_hit(
    cache: SessionCache,
    region: str,
    label: str,
    query: Query,
    call: Call,
    session: AsyncSession,
    baseline: Any,
    sql: SqlCounter,
) -> Any:
    hits, sql_before = cache.stats()[region]["hits"], sql.count
    consumed = await call(session)
    try:
        snapshot = query.snapshot(consumed)
    except Exception as exc:  # an unloaded attribute would need SQL (MissingGreenlet)
        raise CheckFailed(f"{label}: reading the hit failed: {exc!r}") from exc
    if sql.count != sql_before:
        raise CheckFailed(f"{label}: a cache hit emitted SQL")
    if cache.stats()[region]["hits"] != hits + 1:
        raise CheckFailed(f"{label}: the cached call was not a {region} hit")
    if snapshot != baseline:
        raise CheckFailed(f"{label}: the hit differs from the uncached baseline")
    if any(entity not in session for entity in _entities(consumed)):
        raise CheckFailed(f"{label}: a hit's entity is not in the caller's session")
    return consumed


async def check_hits(
    cache: SessionCache,
    region: str,
    queries: Sequence[Query],
    variants: Sequence[str],
    calls: dict[tuple[str, str, str], Call],
    sql: SqlCounter,
) -> None:
    """Warm every entry, then check hits in a new scope and again in the same scope."""
    for query in queries:
        for variant in variants:
            label = f"{query.name} ({variant}, {region})"
            async with cache.scope() as session:
                baseline = query.snapshot(await calls[query.name, variant, "uncached"](session))
            cached = calls[query.name, variant, "cached"]
            async with cache.scope() as session:
                await cached(session)  # warm: a miss for the first variant
            async with cache.scope() as session:
                first = await _checked_hit(
                    cache, region, label, query, cached, session, baseline, sql
                )
                second = await _checked_hit(
                    cache, region, f"{label}, same scope", query, cached, session, baseline, sql
                )
                if any(
                    a is not b for a, b in zip(_entities(first), _entities(second), strict=True)
                ):
                    raise CheckFailed(f"{label}: a second hit in one session made new objects")
    if cache.stats()[region]["errors"]:
        raise CheckFailed(f"region {region!r} counted errors: {cache.stats()[region]}")


async def run_rounds(
    args: argparse.Namespace,
    cache: SessionCache,
    region: str,
    queries: Sequence[Query],
    variants: Sequence[str],
    scopes: Sequence[str],
    calls: dict[tuple[str, str, str], Call],
    sql: SqlCounter,
    reps_of: Callable[[Query], int],
) -> dict[str, list[int]]:
    """Interleaved batches; samples in ns keyed ``query/scope/variant/path/timer``."""
    samples: dict[str, list[int]] = {}
    for number in range(args.rounds):
        order = PATHS if number % 2 == 0 else PATHS[::-1]  # alternate which path goes first
        for query in queries:
            per_round = max(1, reps_of(query) // args.rounds)
            for scope in scopes:
                for variant in variants:
                    for path in order:
                        call = calls[query.name, variant, path]
                        prefix = f"{query.name}/{scope}/{variant}/{path}"
                        async with cache.scope() as session:
                            await call(session)  # untimed warm-up after switching cell
                        sql_before, hits_before = sql.count, cache.stats()[region]["hits"]
                        await time_batch(
                            cache,
                            call,
                            per_round,
                            scope,
                            args.keep_gc,
                            samples.setdefault(f"{prefix}/execute", []),
                            samples.setdefault(f"{prefix}/scope", [])
                            if scope == "request"
                            else None,
                        )
                        if path == "cached":
                            if sql.count != sql_before:
                                raise CheckFailed(f"{prefix}: a timed hit emitted SQL")
                            expected = per_round + (scope == "session")
                            if cache.stats()[region]["hits"] != hits_before + expected:
                                raise CheckFailed(f"{prefix}: a timed call was not a hit")
    return samples


# -- statistics and tables -------------------------------------------------------------------


def _us(samples: list[int], q: float | None = None) -> float:
    if q is None:
        return statistics.median(samples) / 1000
    return statistics.quantiles(samples, n=100, method="inclusive")[round(q * 100) - 1] / 1000


def report_a(samples: dict[str, list[int]], rounds: int) -> list[dict[str, Any]]:
    """Print part A's table of medians and ratios; return its rows."""
    rows = []
    header = (
        f"{'query':<16} {'scope':<8} {'statement':<9} | {'uncached':>8} {'cached':>7} "
        f"{'ratio':>7} | {'+scope:':>7} {'uncached':>8} {'cached':>7} {'ratio':>6} | "
        f"{'target':>6}  result"
    )
    print("median us per call; left: execute timer (gated), right: scope open/close included")
    print(header)
    print("-" * len(header))
    for query in QUERIES:
        target = TARGETS[query.name]
        for scope in SCOPES:
            for variant in VARIANTS:
                prefix = f"{query.name}/{scope}/{variant}"
                row: dict[str, Any] = {"query": query.name, "scope": scope, "statement": variant}
                for timer in ("execute", "scope"):
                    if f"{prefix}/uncached/{timer}" not in samples:
                        continue
                    uncached = samples[f"{prefix}/uncached/{timer}"]
                    cached = samples[f"{prefix}/cached/{timer}"]
                    row[f"{timer}_timer"] = {
                        "uncached_median_us": round(_us(uncached), 2),
                        "cached_median_us": round(_us(cached), 2),
                        "ratio": round(_us(uncached) / _us(cached), 2),
                        "uncached_p99_us": round(_us(uncached, 0.99), 2),
                        "cached_p99_us": round(_us(cached, 0.99), 2),
                    }
                gated = scope == GATED_SCOPE and variant == GATED_VARIANT
                ratio = row["execute_timer"]["ratio"]
                row["target"] = target if gated else None
                row["passed"] = ratio >= target or not gated
                rows.append(row)
                execute, inclusive = row["execute_timer"], row.get("scope_timer")
                line = (
                    f"{query.name:<16} {scope:<8} {variant:<9} | "
                    f"{execute['uncached_median_us']:>8.1f} {execute['cached_median_us']:>7.1f} "
                    f"{ratio:>6.1f}x | {'':>7} "
                )
                if inclusive is not None:
                    line += (
                        f"{inclusive['uncached_median_us']:>8.1f} "
                        f"{inclusive['cached_median_us']:>7.1f} {inclusive['ratio']:>5.1f}x | "
                    )
                else:
                    line += f"{'-':>8} {'-':>7} {'-':>6} | "
                if gated:
                    line += f"{target:>5.1f}x  {'pass' if row['passed'] else 'FAIL'}"
                else:
                    line += f"{'-':>6}  info"
                print(line)
    print("\ngated rows, execute-timer ratio of each round's medians (how much rounds differ):")
    for row in rows:
        if row["target"] is not None:
            prefix = f"{row['query']}/{GATED_SCOPE}/{GATED_VARIANT}"
            row["round_ratios"] = _round_ratios(
                samples[f"{prefix}/uncached/execute"], samples[f"{prefix}/cached/execute"], rounds
            )
            print(f"  {row['query']:<16} " + " ".join(f"{r:.1f}" for r in row["round_ratios"]))
    return rows


def _round_ratios(uncached: list[int], cached: list[int], rounds: int) -> list[float]:
    """Per interleaved round: median uncached / median cached (samples are in round order)."""
    per_round = len(uncached) // rounds
    return [
        round(
            statistics.median(uncached[i * per_round : (i + 1) * per_round])
            / statistics.median(cached[i * per_round : (i + 1) * per_round]),
            2,
        )
        for i in range(rounds)
    ]


def report_b(samples: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Print part B's table of p50/p99 and ratios; return its rows."""
    rows = []
    for timer, title in (
        ("execute", "execute timer (scope already open)"),
        ("scope", "scope open/close included"),
    ):
        header = (
            f"{'query':<16} | {'uncached p50':>12} {'p99':>8} | {'redis hit p50':>13} "
            f"{'p99':>8} | {'ratio p50':>9} {'p99':>6}"
        )
        print(f"\n{title}, us per call ({PART_B_VARIANT} statements, new scope per call)")
        print(header)
        print("-" * len(header))
        for query in PART_B_QUERIES:
            prefix = f"{query.name}/request/{PART_B_VARIANT}"
            uncached = samples[f"{prefix}/uncached/{timer}"]
            cached = samples[f"{prefix}/cached/{timer}"]
            u50, u99, c50, c99 = _us(uncached), _us(uncached, 0.99), _us(cached), _us(cached, 0.99)
            rows.append(
                {
                    "query": query.name,
                    "timer": timer,
                    "calls": len(uncached),
                    "uncached_p50_us": round(u50, 2),
                    "uncached_p99_us": round(u99, 2),
                    "cached_p50_us": round(c50, 2),
                    "cached_p99_us": round(c99, 2),
                    "ratio_p50": round(u50 / c50, 2),
                    "ratio_p99": round(u99 / c99, 2),
                }
            )
            print(
                f"{query.name:<16} | {u50:>12.1f} {u99:>8.1f} | {c50:>13.1f} {c99:>8.1f} | "
                f"{u50 / c50:>8.1f}x {u99 / c99:>5.1f}x"
            )
    return rows


# -- part A ----------------------------------------------------------------------------------


def memory_cache(engine: AsyncEngine) -> SessionCache:
    memory = make_region().configure("async_session_cache.memory")
    return SessionCache(
        async_sessionmaker(engine, expire_on_commit=False), regions={"memory": memory}
    )


async def part_a(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_shared-") as tmp:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp}/bench.db")
        try:
            await populate(engine, ROWS)
            cache = memory_cache(engine)
            sql = SqlCounter(engine)
            calls = {
                (query.name, variant, path): make_call(query, variant, path, "memory")
                for query in QUERIES
                for variant in VARIANTS
                for path in PATHS
            }
            await check_hits(cache, "memory", QUERIES, VARIANTS, calls, sql)
            if args.profile:
                await profile_hits(cache, args.profile_calls)
            started = time.perf_counter()
            with OtherLoad() as load:
                samples = await run_rounds(
                    args,
                    cache,
                    "memory",
                    QUERIES,
                    VARIANTS,
                    SCOPES,
                    calls,
                    sql,
                    lambda q: args.reps,
                )
            elapsed = time.perf_counter() - started
            stats = cache.stats()["memory"]
            sql.close()
            await cache.aclose()
        finally:
            await engine.dispose()
    print(
        f"\n== Part A: memory region vs uncached aiosqlite ({ROWS} users); {args.reps} calls "
        f"per cell in {args.rounds} interleaved rounds, timing took {elapsed:.1f} s"
    )
    rows = report_a(samples, args.rounds)
    print(
        "request: a new scope (session) per call, the realistic shared-region hit (gated);\n"
        "session: all calls of a batch in one scope (entities already in the identity map);\n"
        "prebuilt: new statement per call built before the clock (gated); fresh: built in "
        "the timed call;\nreused: one statement object for every call"
    )
    print(
        f"memory region: {stats['hits']} hits, {stats['misses']} misses, {stats['fills']} "
        f"fills, {stats['errors']} errors, {stats['bytes']} bytes stored"
    )
    print(load.report())
    return {
        "results": rows,
        "stats": stats,
        "other_load": round(load.share, 3),
        "samples_ns": samples,
    }


async def profile_hits(cache: SessionCache, n: int) -> None:
    """pyinstrument profiles of ``n`` request-scope memory hits of each ORM query.

    One profiler session covers the whole loop: the tree splits each call into the scope's
    open (``__aenter__``), ``cached_execute`` plus the consuming call, and the scope's close.
    """
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("--profile needs pyinstrument (.venv/bin/pip install pyinstrument)", file=sys.stderr)
        return
    for query in QUERIES[:2]:
        statements = [query.build() for _ in range(n)]
        held: list[Any] = []
        profiler = Profiler(interval=0.0001, async_mode="disabled")
        gc.collect()
        gc.disable()
        profiler.start()
        for statement in statements:
            async with cache.scope():
                held.append(query.consume(await cached_execute(statement, region="memory")))
        profiler.stop()
        gc.enable()
        held.clear()
        print(f"\n-- profile: {n} request-scope memory hits of {query.name!r} (prebuilt) --")
        print(profiler.output_text(show_all=False))


# -- part B ----------------------------------------------------------------------------------


async def seed_postgres(engine: AsyncEngine) -> None:
    """The users of part A, plus ``ORDERS`` orders generated server-side."""
    await populate(engine, ROWS)
    async with engine.begin() as connection:
        await connection.run_sync(orders_table.metadata.create_all)
        await connection.execute(
            text(
                "INSERT INTO orders (id, user_id, amount_cents, status, created_at) "
                "SELECT g, 1 + (g * 7919) % :users, (g * 37) % 50000, "
                "(ARRAY['paid', 'shipped', 'cancelled', 'refunded'])[1 + g % 4], "
                "TIMESTAMP '2024-01-01' + g * INTERVAL '1 minute' "
                "FROM generate_series(1, :orders) AS g"
            ),
            {"users": ROWS, "orders": ORDERS},
        )
        await connection.execute(text("CREATE INDEX orders_user_id ON orders (user_id)"))
    async with engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.execute(text("ANALYZE"))


async def part_b(
    args: argparse.Namespace, redis_url: str, postgres_url: str, services: float
) -> dict[str, Any]:
    engine = create_async_engine(postgres_url)
    redis = make_region().configure(
        "async_session_cache.redis",
        arguments={"url": redis_url, "prefix": "bench", "timeout": 1.0},
    )
    cache = SessionCache(
        async_sessionmaker(engine, expire_on_commit=False), regions={"redis": redis}, timeout=1.0
    )
    try:
        started = time.perf_counter()
        await seed_postgres(engine)
        setup = time.perf_counter() - started
        sql = SqlCounter(engine)
        calls = {
            (query.name, PART_B_VARIANT, path): make_call(query, PART_B_VARIANT, path, "redis")
            for query in PART_B_QUERIES
            for path in PATHS
        }
        await check_hits(cache, "redis", PART_B_QUERIES, [PART_B_VARIANT], calls, sql)
        started = time.perf_counter()
        samples = await run_rounds(
            args,
            cache,
            "redis",
            PART_B_QUERIES,
            [PART_B_VARIANT],
            ["request"],
            calls,
            sql,
            lambda q: max(args.rounds, args.reps // 3) if q is EXPENSIVE else args.reps,
        )
        elapsed = time.perf_counter() - started
        stats = cache.stats()["redis"]
        sql.close()
    finally:
        await cache.aclose()
        await engine.dispose()
    print(
        f"\n== Part B: redis region vs uncached PostgreSQL/asyncpg (loopback; {ROWS} users, "
        f"{ORDERS} orders; servers started in {services:.1f} s, seeded in {setup:.1f} s); "
        f"{args.reps} calls per cell "
        f"({max(args.rounds, args.reps // 3)} for the join) in {args.rounds} rounds, "
        f"timing took {elapsed:.1f} s"
    )
    rows = report_b(samples)
    print(
        f"redis region: {stats['hits']} hits, {stats['misses']} misses, {stats['fills']} fills, "
        f"{stats['errors']} errors, {stats['bytes']} bytes written"
    )
    return {
        "results": rows,
        "stats": stats,
        "services_s": round(services, 2),
        "seed_s": round(setup, 2),
        "samples_ns": samples,
    }


def run_part_b(args: argparse.Namespace) -> dict[str, Any]:
    """Start redis-server and PostgreSQL (``tests/services.py``) and run part B in them."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.services import ServiceUnavailable, run_postgres, run_redis

    started = time.perf_counter()
    try:
        with run_redis() as redis_server, run_postgres() as postgres:
            url = postgres.create_database("bench_shared")
            services = time.perf_counter() - started
            return asyncio.run(part_b(args, redis_server.url, url, services))
    except ServiceUnavailable as exc:
        return {"skipped": str(exc)}


# -- main ------------------------------------------------------------------------------------


def _package_revision() -> dict[str, Any]:
    """The commit measured, and whether the package had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "async_session_cache"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, never gate (CI)")
    parser.add_argument("--part", choices=("A", "B", "all"), default="all", help="what to run")
    parser.add_argument("--reps", type=int, help="timed calls per query, variant, scope, path")
    parser.add_argument("--rounds", type=int, help="interleaved rounds the reps are split into")
    parser.add_argument("--keep-gc", action="store_true", help="leave gc enabled while timing")
    parser.add_argument("--output", type=Path, default=RESULTS, help="raw JSON results path")
    parser.add_argument(
        "--require-services",
        action="store_true",
        help="fail (exit 3) when part B cannot start redis-server or PostgreSQL",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print pyinstrument profiles of memory hits (A)"
    )
    parser.add_argument("--profile-calls", type=int, default=3000, help="hits per profile")
    args = parser.parse_args()
    args.reps = args.reps or (30 if args.quick else 300)
    args.rounds = args.rounds or (3 if args.quick else 10)
    args.reps = max(1, args.reps // args.rounds) * args.rounds  # whole rounds
    return args


def main() -> int:
    args = parse_args()
    mode = "quick" if args.quick else "default"
    print(
        f"bench_shared ({mode}): SQLAlchemy {sqlalchemy.__version__}, aiosqlite "
        f"{aiosqlite.__version__}, dogpile.cache {dogpile.__version__}, "
        f"Python {platform.python_version()}"
    )
    if not args.keep_gc:
        print("gc disabled during timed batches (gc.collect() before each); --keep-gc to change")
    out: dict[str, Any] = {
        "mode": mode,
        "reps": args.reps,
        "rounds": args.rounds,
        "gc_disabled": not args.keep_gc,
        "versions": {
            "python": platform.python_version(),
            "sqlalchemy": sqlalchemy.__version__,
            "aiosqlite": aiosqlite.__version__,
            "dogpile.cache": dogpile.__version__,
        },
        "targets": TARGETS,
        "package": _package_revision(),
    }
    status = 0
    try:
        if args.part in ("A", "all"):
            out["part_a"] = asyncio.run(part_a(args))
        if args.part in ("B", "all"):
            out["part_b"] = run_part_b(args)
            if "skipped" in out["part_b"]:
                print(f"\nPart B skipped: {out['part_b']['skipped']}", file=sys.stderr)
                if args.require_services:
                    status = 3
    except CheckFailed as exc:
        print(f"correctness check failed: {exc}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1, default=str))
    print(f"\nraw numbers: {args.output}")
    if "part_a" in out:
        failed = [row for row in out["part_a"]["results"] if not row["passed"]]
        if failed:
            names = ", ".join(row["query"] for row in failed)
            print(f"part A misses its target for: {names}", file=sys.stderr)
            if not args.quick:
                status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
