"""A tour of async_session_cache on the example catalogue (aiosqlite, temp file).

A product page is assembled by independent components (header, permission check, detail,
breadcrumb, rating badge, related products, SEO tags, footer) that each load what they need,
so the same reads repeat within one request. The same request mix runs uncached
(``session.execute``) and cached (``cached_execute``), interleaved; then a write shows that
a cached read in the same scope sees the new value at once.

    .venv/bin/python -m examples.demo

The tables and their data are the example service's (``examples/catalogue``).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import selectinload

from async_session_cache import SessionCache, cached_execute
from examples.catalogue.models import Category, Product, Review
from examples.catalogue.seed import CATEGORIES, PRODUCTS, REVIEWS, create_and_seed

REQUESTS = 150

Read = Callable[[Any], Awaitable[Any]]
"""``session.execute`` or ``cached_execute``: the only difference between the two runs."""


async def load_product(read: Read, product_id: int) -> Product:
    """The product row, as the permission check, breadcrumb and SEO tags each load it."""
    product: Product = (await read(select(Product).where(Product.id == product_id))).scalar_one()
    return product


async def rating(read: Read, product_id: int) -> tuple[int, float]:
    """Review count and average rating (an aggregate, used by the badge and the SEO tags)."""
    stmt = select(func.count(Review.id), func.avg(Review.rating))
    count, average = (await read(stmt.where(Review.product_id == product_id))).one()
    return count, round(average or 0.0, 2)


async def category_nav(read: Read) -> list[str]:
    """The category menu of the header and the footer."""
    return list((await read(select(Category.name).order_by(Category.name))).scalars())


async def product_page(read: Read, product_id: int) -> dict[str, Any]:
    """One request: the components of a product page, each doing its own reads."""
    header = await category_nav(read)
    if (await load_product(read, product_id)).price_cents <= 0:  # not-for-sale check
        raise LookupError(product_id)
    stmt = select(Product).where(Product.id == product_id).options(selectinload(Product.reviews))
    detail = (await read(stmt)).scalar_one()
    product = await load_product(read, product_id)  # breadcrumb
    category = (await read(select(Category).where(Category.id == product.category_id))).scalar_one()
    badge = await rating(read, product_id)
    related = select(Product).where(Product.category_id == product.category_id)
    related = related.order_by(Product.price_cents.desc()).limit(5)
    top = [p.name for p in (await read(related)).scalars()]
    seo = ((await load_product(read, product_id)).name, await rating(read, product_id))
    footer = await category_nav(read)
    return {
        "name": detail.name,
        "price": detail.price_cents,
        "reviews": sorted(r.rating for r in detail.reviews),
        "crumbs": (category.name, product.name),
        "badge": badge,
        "related": top,
        "seo": seo,
        "menus": (header, footer),
    }


async def run_workload(cache: SessionCache, sql: list[int]) -> dict[str, Any]:
    """Serve the same requests uncached and cached, interleaved; return counts and latencies."""
    rng = random.Random(11)
    hot = rng.sample(range(1, PRODUCTS + 1), 40)  # a few popular products, many cold ones
    requests = [
        rng.choice(hot) if rng.random() < 0.6 else rng.randint(1, PRODUCTS) for _ in range(REQUESTS)
    ]
    modes: dict[str, Any] = {
        name: {"sql": 0, "latency": [], "pages": []} for name in ("uncached", "cached")
    }
    for product_id in requests[:5]:  # warm SQLAlchemy's compiled-statement cache; not counted
        async with cache.scope() as session:
            await product_page(session.execute, product_id)
    before = cache.stats()["local"]
    for product_id in requests:
        for name, mode in modes.items():
            started, sql_before = time.perf_counter(), sql[0]
            async with cache.scope() as session:
                read = session.execute if name == "uncached" else cached_execute
                mode["pages"].append(await product_page(read, product_id))
            mode["latency"].append(time.perf_counter() - started)
            mode["sql"] += sql[0] - sql_before
    after = cache.stats()["local"]
    modes["cached"]["served"] = after["hits"] - before["hits"]
    modes["uncached"]["served"] = 0
    reads = sum(after[name] - before[name] for name in ("hits", "misses", "coalesced", "bypasses"))
    modes["reads_per_page"] = reads / REQUESTS
    if modes["uncached"]["pages"] != modes["cached"]["pages"]:
        raise SystemExit("FAIL: cached pages differ from uncached pages")
    return modes


async def prove_freshness(cache: SessionCache, sql: list[int], product_id: int) -> None:
    """Read a price through the cache, change it via the ORM and commit, read it again."""

    def price_of() -> Any:
        return select(Product.price_cents).where(Product.id == product_id)

    async with cache.scope() as session:
        before = (await cached_execute(price_of())).scalar_one()
        sql_before = sql[0]
        again = (await cached_execute(price_of())).scalar_one()
        hit = sql[0] == sql_before and again == before
        product = (
            await cached_execute(select(Product).where(Product.id == product_id))
        ).scalar_one()
        product.price_cents = before + 500
        await session.commit()
        sql_before = sql[0]
        after = (await cached_execute(price_of())).scalar_one()
        requeried = sql[0] - sql_before
    print(f"\nFreshness: product #{product_id} in one scope")
    second = "cache hit" if hit else "SQL"
    print(f"  cached read        ${before / 100:,.2f}   (read again: {second})")
    print(f"  product.price_cents = {before + 500}; await session.commit()")
    how = f"{requeried} SQL query: entry invalidated" if requeried else "served from cache"
    print(f"  cached read        ${after / 100:,.2f}   ({how})")
    if after != before + 500:
        print(f"  FAIL: stale read, expected ${(before + 500) / 100:,.2f}", file=sys.stderr)
        raise SystemExit(1)
    print("  OK: the write invalidated the cached price; no stale read")


async def time_one_read(
    cache: SessionCache, sql: list[int], product_id: int, repeats: int = 300
) -> None:
    """Median latency of one product read: uncached execute vs a cache hit, same scope."""

    def statement() -> Any:
        return (
            select(Product).options(selectinload(Product.reviews)).where(Product.id == product_id)
        )

    latencies: dict[str, list[float]] = {"uncached": [], "hit": []}
    hit_sql = 0
    async with cache.scope() as session:
        paths: dict[str, Read] = {"uncached": session.execute, "hit": cached_execute}
        await cached_execute(statement())  # fill the entry the hits read
        for _ in range(repeats):
            for name, read in paths.items():
                prepared, sql_before = statement(), sql[0]
                started = time.perf_counter()
                (await read(prepared)).scalar_one()
                latencies[name].append(time.perf_counter() - started)
                hit_sql += sql[0] - sql_before if name == "hit" else 0
    if hit_sql:
        raise SystemExit(f"FAIL: cache hits ran {hit_sql} SQL statements")
    uncached, hit = (statistics.median(latencies[n]) * 1e6 for n in ("uncached", "hit"))
    print(f"\nOne product read with its reviews (median of {repeats}, same scope)")
    print(f"  session.execute    {uncached:>8.0f} us")
    print(f"  cache hit          {hit:>8.0f} us   {uncached / hit:.0f}x faster, no SQL")


def print_report(modes: dict[str, Any]) -> None:
    """The side-by-side table of the two runs."""
    reads = modes["reads_per_page"]
    print(
        f"\nWorkload: {REQUESTS} product-page requests, one scope each, {reads:.0f} reads per page"
    )
    print(f"\n  {'mode':<26}{'SQL queries':>12}{'from cache':>12}{'median/request':>17}")
    for name, label in (("uncached", "session.execute"), ("cached", "cached_execute")):
        mode = modes[name]
        median_ms = statistics.median(mode["latency"]) * 1000
        print(f"  {label:<26}{mode['sql']:>12,}{mode['served']:>12,}{median_ms:>14.2f} ms")
    uncached, cached = modes["uncached"], modes["cached"]
    fewer = 1 - cached["sql"] / uncached["sql"]
    speedup = statistics.median(uncached["latency"]) / statistics.median(cached["latency"])
    print(f"\n  {fewer:.0%} fewer queries, median request {speedup:.1f}x faster; identical pages")


async def main() -> None:
    """Build the catalogue in a temporary file database, run the tour, clean up."""
    with tempfile.TemporaryDirectory(prefix="asc-demo-") as tmp:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp}/catalogue.db")
        sql = [0]

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def count(*_: Any) -> None:
            sql[0] += 1

        try:
            started = time.perf_counter()
            await create_and_seed(engine)
            print("async_session_cache demo: a product catalogue on aiosqlite (temp file)")
            print(
                f"  {CATEGORIES} categories, {PRODUCTS:,} products, {REVIEWS:,} reviews "
                f"(created in {time.perf_counter() - started:.1f} s)"
            )
            cache = SessionCache(async_sessionmaker(engine, expire_on_commit=False))
            print_report(await run_workload(cache, sql))
            await time_one_read(cache, sql, product_id=7)
            await prove_freshness(cache, sql, product_id=42)
        finally:
            await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
