"""The catalogue API: cached reads per request (local) and across requests (shared).

Reads that any request may reuse (lists, product pages, search, top-rated) go through the
``"shared"`` region; the write endpoints' read-modify-write lookups go through the request's
local region, so they never come from another request's entry, and repeating them costs no
SQL. Writes commit through the request's session, which invalidates the shared entries of the
tables they wrote before ``commit()`` returns: the next read sees them.

Statements are built once, at import; a request gives its values with ``.params()``, which is
cheaper than building the statement again and part of the cache key like any bound value.

    .venv/bin/python -m uvicorn examples.catalogue.app:app --host 127.0.0.1 --port 8000
"""

# No ``from __future__ import annotations`` here: FastAPI evaluates string annotations in the
# module's globals, and the ``Annotated`` aliases the endpoints use are local to create_app().
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from dogpile.cache import make_region
from fastapi import Depends, FastAPI, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy import Integer, Select, bindparam, desc, event, func, select
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import selectinload

from async_session_cache import SessionCache, cached_execute
from async_session_cache.fastapi import session_dependency

from .models import Category, Product, Review
from .seed import create_and_seed

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///catalogue.db"
SHARED = "shared"


class Reads:
    """How one request reads: through the cache, or straight from its session (baseline)."""

    def __init__(self, session: AsyncSession, *, cached: bool) -> None:
        self.session = session
        self.cached = cached

    async def shared(self, statement: Select[Any]) -> Result[Any]:
        """A read other requests may reuse; commits of the tables it read invalidate it."""
        result: Result[Any]
        if self.cached:
            result = await cached_execute(statement, region=SHARED)
        else:
            result = await self.session.execute(statement)
        return result

    async def local(self, statement: Select[Any]) -> Result[Any]:
        """A read only this request reuses; this session's own writes invalidate it."""
        result: Result[Any]
        if self.cached:
            result = await cached_execute(statement)
        else:
            result = await self.session.execute(statement)
        return result


class PriceChange(BaseModel):
    price_cents: int = Field(gt=0)


class NewReview(BaseModel):
    rating: int = Field(ge=1, le=5)
    body: str = Field(min_length=1, max_length=500)


# -- statements, built once: a request binds its values with .params() -----------------------

CATEGORIES = select(Category).order_by(Category.id)
PRODUCT = select(Product).where(Product.id == bindparam("product_id"))
PRODUCT_PAGE = PRODUCT.options(selectinload(Product.category), selectinload(Product.reviews))
PRODUCTS = (
    select(Product)
    .order_by(Product.id)
    .limit(bindparam("limit", type_=Integer))
    .offset(bindparam("offset", type_=Integer))
)
PRODUCTS_IN_CATEGORY = PRODUCTS.where(Product.category_id == bindparam("category_id"))
_AVERAGE = func.avg(Review.rating).label("average")
_REVIEWS = func.count(Review.id).label("reviews")
TOP_RATED = (
    select(Product.id, Product.name, _AVERAGE, _REVIEWS)
    .join(Review, Review.product_id == Product.id)
    .group_by(Product.id, Product.name)
    .order_by(desc(_AVERAGE), desc(_REVIEWS), Product.id)
    .limit(bindparam("n", type_=Integer))
)


# -- reads shared by the endpoints ---------------------------------------------------------


async def product_page(db: Reads, product_id: int) -> Product:
    """The product with its category and reviews, or 404."""
    statement = PRODUCT_PAGE.params(product_id=product_id)
    product: Product | None = (await db.shared(statement)).scalar_one_or_none()
    if product is None:
        raise HTTPException(404, f"no product {product_id}")
    return product


async def rating_of(db: Reads, product_id: int) -> dict[str, Any]:
    """Count and average rating of a product (reads its page again: no SQL when cached)."""
    ratings = [review.rating for review in (await product_page(db, product_id)).reviews]
    average = round(sum(ratings) / len(ratings), 3) if ratings else None
    return {"count": len(ratings), "average": average}


async def product_for_update(db: Reads, product_id: int) -> Product:
    """The product a write is about, read in this request only, or 404."""
    result = await db.local(PRODUCT.params(product_id=product_id))
    product: Product | None = result.scalar()
    if product is None:
        raise HTTPException(404, f"no product {product_id}")
    return product


async def check_price_change(db: Reads, product_id: int, price_cents: int) -> None:
    """Refuse a price change by more than a factor of 100 at once (422)."""
    current = (await product_for_update(db, product_id)).price_cents
    if not current / 100 <= price_cents <= current * 100:
        raise HTTPException(422, f"price of product {product_id} may change at most 100x")


def product_json(product: Product) -> dict[str, Any]:
    return {
        "id": product.id,
        "name": product.name,
        "price_cents": product.price_cents,
        "category_id": product.category_id,
    }


# -- the application -------------------------------------------------------------------------


def create_app(database_url: str | None = None, *, cached: bool = True) -> FastAPI:
    """The catalogue app on ``database_url`` (default: ``CATALOGUE_DATABASE_URL``, else
    ``./catalogue.db``); ``cached=False`` serves the same endpoints with plain
    ``session.execute``. Tables are created and seeded at startup when empty."""
    url = database_url or os.environ.get("CATALOGUE_DATABASE_URL") or DEFAULT_DATABASE_URL
    engine = _engine(url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    cache = (
        SessionCache(
            sessions,
            regions={
                SHARED: make_region().configure(
                    "async_session_cache.memory", arguments={"max_entries": 20_000}
                )
            },
        )
        if cached
        else None
    )
    statements = [0]
    open_plain_sessions = [0]

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def count_statement(*args: Any) -> None:
        statements[0] += 1

    async def plain_session() -> AsyncIterator[AsyncSession]:
        open_plain_sessions[0] += 1
        try:
            async with sessions() as session:
                yield session
        finally:
            open_plain_sessions[0] -= 1

    SessionDep = Annotated[
        AsyncSession, Depends(session_dependency(cache) if cache else plain_session)
    ]

    def reads(session: AsyncSession) -> Reads:
        # Built in the endpoint: one dependency level less per request, cached or not.
        return Reads(session, cached=cache is not None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await create_and_seed(engine)
        try:
            yield
        finally:
            if cache is not None:
                await cache.aclose()
            await engine.dispose()

    app = FastAPI(title="catalogue", lifespan=lifespan)
    app.state.engine = engine
    app.state.cache = cache

    @app.get("/categories")
    async def categories(session: SessionDep) -> list[dict[str, Any]]:
        db = reads(session)
        rows = (await db.shared(CATEGORIES)).scalars()
        return [{"id": c.id, "name": c.name} for c in rows]

    @app.get("/products")
    async def products(
        session: SessionDep,
        category_id: int | None = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[dict[str, Any]]:
        db = reads(session)
        if category_id is None:
            statement = PRODUCTS.params(limit=limit, offset=offset)
        else:
            statement = PRODUCTS_IN_CATEGORY.params(
                category_id=category_id, limit=limit, offset=offset
            )
        return [product_json(p) for p in (await db.shared(statement)).scalars()]

    @app.get("/products/{product_id}")
    async def product(session: SessionDep, product_id: int) -> dict[str, Any]:
        db = reads(session)
        page = await product_page(db, product_id)
        return {
            **product_json(page),
            "category": {"id": page.category.id, "name": page.category.name},
            "rating": await rating_of(db, product_id),
            "reviews": [{"id": r.id, "rating": r.rating, "body": r.body} for r in page.reviews],
        }

    @app.get("/search")
    async def search(
        session: SessionDep, q: Annotated[str, Query(min_length=1, max_length=50)]
    ) -> list[dict[str, Any]]:
        db = reads(session)
        statement = (
            select(Product)
            .where(Product.name.icontains(q, autoescape=True))
            .order_by(Product.id)
            .limit(50)
        )
        return [product_json(p) for p in (await db.shared(statement)).scalars()]

    @app.get("/top")
    async def top(
        session: SessionDep, n: Annotated[int, Query(ge=1, le=100)] = 10
    ) -> list[dict[str, Any]]:
        db = reads(session)
        statement = TOP_RATED.params(n=n)
        return [
            {**row, "average": round(float(row["average"]), 3)}
            for row in (await db.shared(statement)).mappings()
        ]

    @app.post("/products/{product_id}/reviews", status_code=201)
    async def add_review(session: SessionDep, product_id: int, new: NewReview) -> dict[str, Any]:
        db = reads(session)
        await product_for_update(db, product_id)
        review = Review(product_id=product_id, rating=new.rating, body=new.body)
        session.add(review)
        await session.commit()
        return {
            "id": review.id,
            "product_id": product_id,
            "rating": review.rating,
            "body": review.body,
            "product_rating": await rating_of(db, product_id),
        }

    @app.patch("/products/{product_id}")
    async def change_price(
        session: SessionDep, product_id: int, change: PriceChange
    ) -> dict[str, Any]:
        db = reads(session)
        await check_price_change(db, product_id, change.price_cents)
        product = await product_for_update(db, product_id)  # the same read again: no SQL
        product.price_cents = change.price_cents
        await session.commit()
        return product_json(product)

    @app.get("/_health")
    async def health() -> dict[str, Any]:
        """Open sessions and checked-out connections: both 0 when the server is idle."""
        stats = cache.stats() if cache else {}
        return {
            "cached": cache is not None,
            "sessions": stats["local"]["sessions"] if cache else open_plain_sessions[0],
            "registry": len(cache.session.registry.registry) if cache else 0,
            "checked_out": getattr(engine.pool, "checkedout", lambda: 0)(),
            "statements": statements[0],
            "shared": {k: stats[SHARED][k] for k in ("hits", "misses")} if cache else {},
        }

    return app


def _engine(url: str) -> AsyncEngine:
    if not url.startswith("sqlite"):
        return create_async_engine(url, pool_size=10, max_overflow=10)
    engine = create_async_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine.sync_engine, "connect")
    def wal_mode(dbapi_connection: Any, connection_record: Any) -> None:
        # Readers do not block the writer (and the other way round) in WAL mode.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


app = create_app(cached=os.environ.get("CATALOGUE_CACHED", "1") != "0")
