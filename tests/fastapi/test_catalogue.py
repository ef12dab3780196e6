"""The catalogue example in process: the cached app answers exactly as the uncached one, and
reads cached across requests still see every committed write."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.catalogue.app import create_app
from examples.catalogue.seed import CATEGORIES, PRODUCTS
from tests.fastapi.conftest import client_of


@dataclass
class Catalogue:
    cached: httpx.AsyncClient
    uncached: httpx.AsyncClient

    async def health(self) -> dict[str, Any]:
        health: dict[str, Any] = (await self.cached.get("/_health")).json()
        return health


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def catalogue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Catalogue]:
    """The cached and the uncached app, each started (seeded) on its own database."""
    if request.param == "sqlite":
        urls = [f"sqlite+aiosqlite:///{tmp_path / name}.db" for name in ("cached", "uncached")]
    else:
        server = request.getfixturevalue("postgres_server")
        urls = [server.create_database(), server.create_database()]
        for url in urls:
            request.addfinalizer(lambda url=url: server.drop_database(url.rsplit("/", 1)[1]))
    async with AsyncExitStack() as stack:
        clients = []
        for url, cached in zip(urls, (True, False), strict=True):
            app = create_app(url, cached=cached)
            await stack.enter_async_context(app.router.lifespan_context(app))
            clients.append(await stack.enter_async_context(client_of(app)))
        yield Catalogue(*clients)
        for client in clients:
            health = (await client.get("/_health")).json()
            assert (health["sessions"], health["registry"], health["checked_out"]) == (0, 0, 0)


READS = [
    "/categories",
    "/products",
    "/products?limit=100&offset=1900",
    "/products?category_id=3&limit=5&offset=5",
    "/products?category_id=999",
    "/products/1",
    f"/products/{PRODUCTS}",
    "/products/77",
    f"/products/{PRODUCTS + 1}",
    "/search?q=lamp",
    "/search?q=STEEL%20chair",
    "/search?q=%25",
    "/search?q=nothing-like-this",
    "/top",
    "/top?n=1",
    "/top?n=100",
    "/products?limit=0",
    "/search",
]


async def test_cached_app_answers_as_uncached(catalogue: Catalogue) -> None:
    """Every read returns the same status and JSON cached (cold and warm) as uncached."""
    for path in READS:
        expected = await catalogue.uncached.get(path)
        cold = await catalogue.cached.get(path)
        warm = await catalogue.cached.get(path)
        assert cold.status_code == warm.status_code == expected.status_code, path
        assert cold.json() == warm.json() == expected.json(), path


async def test_seeded_data_is_what_the_endpoints_serve(catalogue: Catalogue) -> None:
    """Lists, detail, search and top return coherent seeded data."""
    client = catalogue.cached
    assert len((await client.get("/categories")).json()) == CATEGORIES
    listed = (await client.get("/products?category_id=4&limit=100")).json()
    assert listed and all(p["category_id"] == 4 for p in listed)
    detail = (await client.get(f"/products/{listed[0]['id']}")).json()
    assert detail["category"]["id"] == 4
    assert detail["rating"]["count"] == len(detail["reviews"])
    assert all("lamp" in p["name"].lower() for p in (await client.get("/search?q=lamp")).json())
    top = (await client.get("/top?n=20")).json()
    assert [row["average"] for row in top] == sorted((row["average"] for row in top), reverse=True)


async def test_warm_reads_run_no_sql(catalogue: Catalogue) -> None:
    """Once warm, a product page (two reads of the product) and a list cost no statement."""
    for path in ("/products/5", "/products?category_id=2"):
        await catalogue.cached.get(path)
        before = (await catalogue.health())["statements"]
        await catalogue.cached.get(path)
        assert (await catalogue.health())["statements"] == before


async def test_review_is_visible_in_next_read(catalogue: Catalogue) -> None:
    """A review posted through the cached app shows on the (cached) product page next."""
    client = catalogue.cached
    before = (await client.get("/products/9")).json()
    created = await client.post("/products/9/reviews", json={"rating": 5, "body": "superb"})
    assert created.status_code == 201
    review = created.json()
    after = (await client.get("/products/9")).json()
    assert after["reviews"][-1] == {"id": review["id"], "rating": 5, "body": "superb"}
    assert after["rating"]["count"] == before["rating"]["count"] + 1
    assert review["product_rating"] == after["rating"]
    missing = await client.post("/products/99999/reviews", json={"rating": 1, "body": "x"})
    assert missing.status_code == 404


async def test_price_change_is_visible_in_next_reads(catalogue: Catalogue) -> None:
    """After a PATCH, the cached detail, list and search show the new price."""
    client = catalogue.cached
    product = (await client.get("/products/12")).json()
    listing = f"/products?category_id={product['category_id']}&limit=100"
    word = product["name"].split()[-1]  # the zero-padded number: unique to this product
    for path in (listing, f"/search?q={word}"):
        assert product["id"] in [p["id"] for p in (await client.get(path)).json()]
    new_price = product["price_cents"] + 1
    changed = await client.patch("/products/12", json={"price_cents": new_price})
    assert changed.json() == {**{k: product[k] for k in changed.json()}, "price_cents": new_price}
    assert (await client.get("/products/12")).json()["price_cents"] == new_price
    for path in (listing, f"/search?q={word}"):
        prices = {p["id"]: p["price_cents"] for p in (await client.get(path)).json()}
        assert prices[12] == new_price


async def test_write_endpoint_repeats_its_lookup_without_sql(catalogue: Catalogue) -> None:
    """PATCH reads the product twice (check, then update): one SELECT cached, two uncached."""
    counts = []
    for client in (catalogue.cached, catalogue.uncached):
        before = (await client.get("/_health")).json()["statements"]
        assert (await client.patch("/products/3", json={"price_cents": 4321})).status_code == 200
        counts.append((await client.get("/_health")).json()["statements"] - before)
    assert counts == [2, 3]  # SELECT (+ SELECT uncached) + UPDATE


async def test_refused_price_change_leaves_cached_reads_alone(catalogue: Catalogue) -> None:
    """A 422 write commits nothing: the cached page still shows the old price."""
    client = catalogue.cached
    product = (await client.get("/products/20")).json()
    huge = product["price_cents"] * 1000
    assert (await client.patch("/products/20", json={"price_cents": huge})).status_code == 422
    assert (await client.get("/products/20")).json() == product
