"""Local-region hits against the uncached ``AsyncSession.execute`` baseline, on aiosqlite.

Three queries from DESIGN.md, each timed uncached (``await session.execute(stmt)``) and as a
local-region hit (``await cached_execute(stmt)``) inside one scope, in three variants:

- ``prebuilt``: every call gets a new statement object, built before the clock starts: the
  cost of executing a statement, which a hit pays in full (SQLAlchemy's cache key included).
  This is the variant the 20x target applies to;
- ``fresh``: the statement is also built inside the timed call, as a request handler would
  (both paths pay the same ~15 us of construction on top);
- ``reused``: one statement object is reused (SQLAlchemy memoizes its cache key on it).

Baseline and cached rounds are interleaved so both share the machine's noise; each figure is
the median of per-call ``perf_counter_ns`` timings. Before timing, every hit is checked to
return the baseline's rows and to emit no SQL; a failed check exits with status 2.

    .venv/bin/python benchmarks/bench_local.py           # default: gate on the 20x target
    .venv/bin/python benchmarks/bench_local.py --quick   # CI: a few seconds, report only

Raw samples go to ``benchmarks/results/bench_local.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import sqlalchemy
from machine import OtherLoad
from sqlalchemy import Boolean, DateTime, Integer, String, event, insert, select
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_cache import SessionCache, cached_execute

TARGET = 20.0
ROWS = 5_000
PK = 4_242
RESULTS = Path(__file__).resolve().parent / "results" / "bench_local.json"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    email: Mapped[str] = mapped_column(String(128), unique=True)
    age: Mapped[int] = mapped_column(Integer)
    city: Mapped[str] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime)


users_table = Base.metadata.tables["users"]
USER_COLUMNS = [column.key for column in users_table.columns]


@dataclass(frozen=True)
class Query:
    """A benchmarked query: how to build its statement and how to consume its result."""

    name: str
    build: Callable[[], Any]
    consume: Callable[[Any], Any]
    snapshot: Callable[[Any], Any]
    """Turns a consumed result into plain values, to compare a hit with the baseline."""


def _orm_values(users: Any) -> list[tuple[Any, ...]]:
    return [tuple(getattr(user, key) for key in USER_COLUMNS) for user in users]


QUERIES = [
    Query(
        "1 ORM row by PK",
        lambda: select(User).where(User.id == PK),
        lambda result: result.scalar_one(),
        lambda user: _orm_values([user]),
    ),
    Query(
        "100 ORM rows",
        lambda: select(User).where(User.id <= 100),
        lambda result: result.scalars().all(),
        _orm_values,
    ),
    Query(
        "1000 Core rows",
        lambda: select(users_table).where(users_table.c.id <= 1000),
        lambda result: result.all(),
        lambda rows: [tuple(row) for row in rows],
    ),
]
VARIANTS = ("prebuilt", "fresh", "reused")
GATED_VARIANT = "prebuilt"
PATHS = ("uncached", "cached")


class CheckFailed(Exception):
    """A correctness check failed: the numbers would be meaningless."""


async def populate(engine: AsyncEngine, rows: int) -> None:
    """Create the ``users`` table and insert ``rows`` deterministic users."""
    start = datetime(2024, 1, 1)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
        await connection.execute(
            insert(users_table),
            [
                {
                    "id": i,
                    "name": f"user {i}",
                    "email": f"user{i}@example.com",
                    "age": 18 + i % 60,
                    "city": ("Lyon", "Oslo", "Lima", "Pune", "Kobe")[i % 5],
                    "active": i % 7 != 0,
                    "created_at": start + timedelta(minutes=i),
                }
                for i in range(1, rows + 1)
            ],
        )


def make_call(
    query: Query, variant: str, path: str, session: AsyncSession
) -> Callable[[], Awaitable[Any]]:
    """The coroutine function one timed call runs: build (or reuse), execute, consume."""
    build, consume = query.build, query.consume
    execute: Callable[[Any], Awaitable[Any]] = (
        session.execute if path == "uncached" else cached_execute
    )
    if variant == "fresh":

        async def call() -> Any:
            return consume(await execute(build()))

    elif variant == "prebuilt":
        statements: list[Any] = []

        async def call() -> Any:
            return consume(await execute(statements.pop() if statements else build()))

        call.prepare = lambda n: statements.extend(build() for _ in range(n))  # type: ignore[attr-defined]

    else:
        statement = build()

        async def call() -> Any:
            return consume(await execute(statement))

    return call


async def time_rounds(
    call: Callable[[], Awaitable[Any]], n: int, keep_gc: bool, samples: list[int]
) -> None:
    """Append the duration of ``n`` calls, in nanoseconds, to ``samples``."""
    clock = time.perf_counter_ns
    prepare = getattr(call, "prepare", None)
    if prepare is not None:
        prepare(n)  # statements for the timed calls, built before the clock starts
    gc.collect()
    if not keep_gc:
        gc.disable()
    try:
        for _ in range(n):
            t0 = clock()
            await call()
            samples.append(clock() - t0)
    finally:
        gc.enable()


async def check_hits(
    cache: SessionCache, calls: dict[tuple[str, str, str], Any], sql: list[int]
) -> None:
    """Warm every entry, then check each hit equals the baseline and emits no SQL."""
    for query in QUERIES:
        for variant in VARIANTS:
            baseline = query.snapshot(await calls[query.name, variant, "uncached"]())
            await calls[query.name, variant, "cached"]()  # warm (a miss for the first variant)
            hits_before, sql_before = cache.stats()["local"]["hits"], sql[0]
            hit = query.snapshot(await calls[query.name, variant, "cached"]())
            if sql[0] != sql_before:
                raise CheckFailed(f"{query.name} ({variant}): a cache hit emitted SQL")
            if cache.stats()["local"]["hits"] != hits_before + 1:
                raise CheckFailed(f"{query.name} ({variant}): the cached call was not a hit")
            if hit != baseline:
                raise CheckFailed(f"{query.name} ({variant}): the hit differs from the baseline")


async def measure(args: argparse.Namespace, engine: AsyncEngine) -> dict[str, Any]:
    """Run the interleaved rounds; return samples in ns keyed ``query/variant/path``."""
    sql = [0]

    def count_sql(*_: Any) -> None:
        sql[0] += 1

    event.listen(engine.sync_engine, "before_cursor_execute", count_sql)
    cache = SessionCache(async_sessionmaker(engine, expire_on_commit=False))
    samples: dict[str, list[int]] = {}
    async with cache.scope() as session:
        calls = {
            (query.name, variant, path): make_call(query, variant, path, session)
            for query in QUERIES
            for variant in VARIANTS
            for path in PATHS
        }
        await check_hits(cache, calls, sql)
        per_round = args.reps // args.rounds
        for number in range(args.rounds):
            order = PATHS if number % 2 == 0 else PATHS[::-1]  # alternate which path goes first
            for query in QUERIES:
                for variant in VARIANTS:
                    for path in order:
                        call = calls[query.name, variant, path]
                        await call()  # untimed warm-up after switching query
                        sql_before = sql[0]
                        await time_rounds(
                            call,
                            per_round,
                            args.keep_gc,
                            samples.setdefault(f"{query.name}/{variant}/{path}", []),
                        )
                        if path == "cached" and sql[0] != sql_before:
                            raise CheckFailed(f"{query.name} ({variant}): a timed hit emitted SQL")
        stats = cache.stats()["local"]
    event.remove(engine.sync_engine, "before_cursor_execute", count_sql)
    return {"samples_ns": samples, "stats": stats}


def report(args: argparse.Namespace, samples: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Print the table of medians and ratios; return its rows."""
    rows = []
    header = f"{'query':<17} {'statement':<9} {'uncached us':>12} {'cached us':>10} "
    header += f"{'ratio':>8} {'target':>7}  result"
    print(header)
    print("-" * len(header))
    for query in QUERIES:
        for variant in VARIANTS:
            uncached = statistics.median(samples[f"{query.name}/{variant}/uncached"]) / 1000
            cached = statistics.median(samples[f"{query.name}/{variant}/cached"]) / 1000
            ratio = uncached / cached
            gated = variant == GATED_VARIANT
            passed = ratio >= TARGET or not gated
            rows.append(
                {
                    "query": query.name,
                    "statement": variant,
                    "uncached_median_us": round(uncached, 2),
                    "cached_median_us": round(cached, 2),
                    "ratio": round(ratio, 2),
                    "target": TARGET if gated else None,
                    "passed": passed,
                }
            )
            print(
                f"{query.name:<17} {variant:<9} {uncached:>12.1f} {cached:>10.2f} "
                f"{ratio:>7.1f}x "
                + (
                    f"{TARGET:>6.0f}x  {'pass' if passed else 'FAIL'}"
                    if gated
                    else f"{'-':>7}  info"
                )
            )
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, never gate (CI)")
    parser.add_argument("--reps", type=int, help="timed calls per query, variant and path")
    parser.add_argument("--rounds", type=int, help="interleaved rounds the reps are split into")
    parser.add_argument("--keep-gc", action="store_true", help="leave gc enabled while timing")
    parser.add_argument("--output", type=Path, default=RESULTS, help="raw JSON results path")
    args = parser.parse_args()
    args.reps = args.reps or (30 if args.quick else 300)
    args.rounds = args.rounds or (3 if args.quick else 10)
    args.reps = max(1, args.reps // args.rounds) * args.rounds  # whole rounds
    return args


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench_local-") as tmp:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp}/bench.db")
        try:
            await populate(engine, ROWS)
            started = time.perf_counter()
            with OtherLoad() as load:
                measured = await measure(args, engine)
            elapsed = time.perf_counter() - started
        finally:
            await engine.dispose()
    mode = "quick" if args.quick else "default"
    print(
        f"bench_local ({mode}): {args.reps} timed calls per cell in {args.rounds} interleaved "
        f"rounds, {ROWS} users, SQLAlchemy {sqlalchemy.__version__}, "
        f"aiosqlite {aiosqlite.__version__}, Python {platform.python_version()}"
    )
    if not args.keep_gc:
        print("gc disabled during timed rounds (gc.collect() before each); --keep-gc to change")
    print()
    rows = report(args, measured["samples_ns"])
    print(
        "\nprebuilt: a new statement object per call, built before the clock (the gated row);\n"
        "fresh: also built inside the timed call; reused: one statement object for all calls"
    )
    stats = measured["stats"]
    print(
        f"\nlocal region: {stats['hits']} hits, {stats['misses']} misses, "
        f"{stats['bypasses']} bypasses; timing took {elapsed:.1f} s"
    )
    print(load.report())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "mode": mode,
                "reps": args.reps,
                "rounds": args.rounds,
                "gc_disabled": not args.keep_gc,
                "rows": ROWS,
                "versions": {
                    "python": platform.python_version(),
                    "sqlalchemy": sqlalchemy.__version__,
                    "aiosqlite": aiosqlite.__version__,
                },
                "results": rows,
                "stats": stats,
                "other_load": round(load.share, 3),
                "samples_ns": measured["samples_ns"],
            },
            indent=1,
        )
    )
    print(f"raw numbers: {args.output}")
    failed = [row for row in rows if not row["passed"]]
    if failed and not args.quick:
        print(
            f"\n{len(failed)} of {len(rows)} ratios miss the {TARGET:.0f}x target", file=sys.stderr
        )
        return 1
    return 0


def main() -> int:
    args = parse_args()
    try:
        return asyncio.run(run(args))
    except CheckFailed as exc:
        print(f"correctness check failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
