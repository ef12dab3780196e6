"""The catalogue under a real uvicorn process: concurrent load with writes, abrupt client
disconnects, then every session closed, every connection checked in, and a flat RSS."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.catalogue.server import Server, serve

CLIENTS = 64
ROUNDS = 3
REQUESTS_PER_ROUND = 1_700  # 5,100 in all, write checks included
WRITE_SHARE = 0.05
RSS_TOLERANCE = 10 << 20
HOT_PRODUCTS = 400  # reads stay on a working set the first round warms
WORDS = ("lamp", "steel", "chair", "wool", "mug", "rustic", "0042", "bag", "smart", "hat")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """The cached catalogue on uvicorn (one worker), seeded on a fresh aiosqlite file."""
    log = tmp_path / "server.log"
    with serve(f"sqlite+aiosqlite:///{tmp_path / 'catalogue.db'}", log, cached=True) as running:
        yield running
    text = running.log_text()
    # uvicorn exits by re-raising SIGTERM once its graceful shutdown (lifespan included) is done
    assert running.process.returncode in (0, -signal.SIGTERM), text[-3000:]
    assert "Application shutdown complete." in text, text[-3000:]
    for marker in ("Traceback", "ERROR", "Warning", "non-checked-in"):
        assert marker not in text, text[-3000:]


class Worker:
    """One of the concurrent clients; it owns a few products that only it writes to."""

    def __init__(self, number: int, client: httpx.AsyncClient) -> None:
        self.client = client
        self.owned = list(range(1001 + number, 2001, CLIENTS))
        self.rng = random.Random(number)
        self.statuses: Counter[int] = Counter()
        self.requests = 0

    async def get(self, path: str) -> Any:
        return await self.send("GET", path)

    async def send(self, method: str, path: str, body: Any = None) -> Any:
        response = await self.client.request(method, path, json=body)
        self.requests += 1
        self.statuses[response.status_code] += 1
        assert response.is_success, (method, path, response.status_code, response.text)
        return response.json()

    async def read(self, kind: str) -> None:
        """One read; its answer must be about what this request asked for."""
        rng = self.rng
        if kind == "detail":
            pid = rng.randint(1, HOT_PRODUCTS)
            page = await self.get(f"/products/{pid}")
            assert page["id"] == pid and page["category"]["id"] == page["category_id"]
            assert page["rating"]["count"] == len(page["reviews"])
        elif kind == "list":
            cid, limit, offset = rng.randint(1, 20), rng.choice((5, 20)), rng.choice((0, 20, 40))
            products = await self.get(f"/products?category_id={cid}&limit={limit}&offset={offset}")
            assert len(products) <= limit and {p["category_id"] for p in products} <= {cid}
            assert [p["id"] for p in products] == sorted(p["id"] for p in products)
        elif kind == "search":
            word = rng.choice(WORDS)
            found = await self.get(f"/search?q={word}")
            assert found and all(word in p["name"].lower() for p in found)
        else:
            n = rng.choice((5, 10, 20))
            top = await self.get(f"/top?n={n}")
            averages = [row["average"] for row in top]
            assert len(top) == n and averages == sorted(averages, reverse=True)

    async def write(self) -> None:
        """A PATCH or a POST on an owned product, then a read that must show it."""
        pid = self.rng.choice(self.owned)
        if self.rng.random() < 0.5:
            price = self.rng.randint(1_000, 10_000)  # within 100x of every seeded price
            changed = await self.send("PATCH", f"/products/{pid}", {"price_cents": price})
            assert (changed["id"], changed["price_cents"]) == (pid, price)
            assert (await self.get(f"/products/{pid}"))["price_cents"] == price
        else:
            rating = self.rng.randint(1, 5)
            body = {"rating": rating, "body": f"load {pid} {self.requests}"}
            review = await self.send("POST", f"/products/{pid}/reviews", body)
            assert (review["product_id"], review["rating"]) == (pid, rating)
            page = await self.get(f"/products/{pid}")
            assert review["id"] in [r["id"] for r in page["reviews"]]


async def run_round(server: Server, round_number: int) -> Counter[int]:
    """REQUESTS_PER_ROUND requests from CLIENTS concurrent clients; their status counts."""
    rng = random.Random(round_number)
    kinds = rng.choices(("detail", "list", "search", "top"), (45, 25, 15, 10), k=10_000)
    jobs = iter(["write" if rng.random() < WRITE_SHARE else kind for kind in kinds])
    total = 0

    async def work(number: int) -> Counter[int]:
        nonlocal total
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
            worker = Worker(number + CLIENTS * round_number, client)
            while total < REQUESTS_PER_ROUND:
                job = next(jobs)
                before = worker.requests
                await (worker.write() if job == "write" else worker.read(job))
                total += worker.requests - before
        return worker.statuses

    statuses = await asyncio.gather(*(work(n) for n in range(CLIENTS)), disconnects(server))
    return sum(statuses[:-1], Counter())


async def disconnects(server: Server) -> Counter[int]:
    """Clients that hang up right after sending a request (or half of one)."""
    host, port = server.url.removeprefix("http://").split(":")
    for n in range(24):
        _, writer = await asyncio.open_connection(host, int(port))
        path = "/top?n=100" if n % 3 == 0 else f"/products/{n + 1}"
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"
        writer.write(request.encode()[: None if n % 4 else 20])
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    return Counter()


async def settled_health(server: Server) -> dict[str, Any]:
    """/_health once nothing is in flight (disconnected requests may still be finishing)."""
    deadline = time.monotonic() + 15
    async with httpx.AsyncClient(base_url=server.url) as client:
        while True:
            health: dict[str, Any] = (await client.get("/_health")).json()
            if (health["sessions"], health["checked_out"]) == (0, 0) or (
                time.monotonic() > deadline
            ):
                return health
            await asyncio.sleep(0.05)


async def test_load_with_writes_and_disconnects_leaks_nothing(server: Server) -> None:
    """64 clients x 3 rounds (>= 5,000 requests, ~5% writes): all 2xx with their own data,
    writes visible to the next read, no session or connection left, RSS flat after warm-up."""
    rss = []
    statuses: Counter[int] = Counter()
    for round_number in range(ROUNDS):
        statuses += await run_round(server, round_number)
        health = await settled_health(server)
        assert (health["sessions"], health["registry"], health["checked_out"]) == (0, 0, 0)
        rss.append(server.rss_bytes())
    assert sum(statuses.values()) >= ROUNDS * REQUESTS_PER_ROUND
    assert set(statuses) <= {200, 201}
    assert statuses[201] > 0 and statuses[200] > statuses[201]
    assert rss[2] - rss[1] < RSS_TOLERANCE, [f"{r / 2**20:.1f} MiB" for r in rss]
