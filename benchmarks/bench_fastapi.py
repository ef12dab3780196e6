"""The catalogue example behind real uvicorn servers: cached app against uncached app.

Two servers run side by side on 127.0.0.1 (one uvicorn worker each, aiosqlite, the same seeded
data): ``create_app(cached=True)`` and ``create_app(cached=False)``, which serve the same
endpoints with plain ``session.execute``. A load generator in a separate process keeps 64
concurrent keep-alive clients busy for a fixed time per endpoint and variant; variants are
interleaved, the order alternating each repeat, so both share the machine's noise. Both servers
are warmed first (every product page and list page once): cached figures are steady-state hits.

The default client is a minimal HTTP/1.1 client on asyncio streams (~40 us of CPU a request):
64 ``httpx.AsyncClient``s in one process top out near 1,000 requests/s at ~75% of a core,
below what the cached server serves, so with ``--client httpx`` the client is the bottleneck.
With 2 cores, one runs the server under load and one the load generator; ``other`` shows how
much CPU everything else on the machine took meanwhile (it competes with the server).

Reported per endpoint: requests/s (median of the repeats), p50/p99 latency, statements sent to
the database per request, and the CPU share of the server, of the client, and of the rest.
``ceiling`` (``/_health``: no database, no cache) is what uvicorn + FastAPI can serve at best:
that fixed per-request cost bounds any ratio, most for endpoints whose uncached cost is a
single fast query (the product list).

    .venv/bin/python benchmarks/bench_fastapi.py           # gate: cached >= 3x uncached RPS
    .venv/bin/python benchmarks/bench_fastapi.py --quick   # CI: a few seconds, report only
    .venv/bin/python benchmarks/bench_fastapi.py --stack plain  # h11 + asyncio instead

Both servers run on uvicorn's defaults, which take httptools and uvloop when installed (as
``uvicorn[standard]`` and ``.[test]`` install them): the stack a production deployment uses.

The gate applies to the product page and the product list (exit 1 when missed, 2 on errors
or sessions left open); results go to ``benchmarks/results/bench_fastapi.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_seconds, machine_busy_seconds  # noqa: E402

from examples.catalogue.seed import CATEGORIES, PRODUCTS  # noqa: E402
from examples.catalogue.server import Server, serve  # noqa: E402

TARGET = 3.0
GATED = ("detail", "list")
RESULTS = ROOT / "benchmarks" / "results" / "bench_fastapi.json"
WORDS = ("lamp", "steel", "chair", "wool", "mug", "rustic", "bag", "smart", "hat", "0042")


def endpoint_path(endpoint: str, rng: random.Random) -> str:
    if endpoint == "detail":
        return f"/products/{rng.randint(1, PRODUCTS)}"
    if endpoint == "list":
        return (
            f"/products?category_id={rng.randint(1, CATEGORIES)}&offset={rng.randrange(0, 100, 20)}"
        )
    if endpoint == "search":
        return f"/search?q={rng.choice(WORDS)}"
    if endpoint == "top":
        return f"/top?n={rng.choice((5, 10, 20))}"
    return "/_health"


ENDPOINTS = ("detail", "list", "search", "top", "ceiling")
STACKS = {
    "auto": (),
    "plain": ("--http", "h11", "--loop", "asyncio"),
    "fast": ("--http", "httptools", "--loop", "uvloop"),
}
"""uvicorn's HTTP parser and event loop; ``auto`` is uvicorn's default choice."""


def stack_label(stack: str) -> str:
    """What a stack runs on, ``auto`` resolved as uvicorn resolves it."""
    if stack != "auto":
        return " ".join(STACKS[stack])
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"--http {http} --loop {loop} (uvicorn's defaults)"


@dataclass
class Run:
    """One timed run of one endpoint on one server (from one load process)."""

    requests: int
    errors: int
    seconds: float
    client_cpu: float
    latencies_ms: list[float]


class RawClient:
    """A minimal HTTP/1.1 keep-alive GET client on asyncio streams: a few tens of
    microseconds of CPU per request, so it is not what bounds the server's figures."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawClient:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.writer is not None
        self.writer.close()
        await self.writer.wait_closed()

    async def get(self, path: str) -> int:
        """GET ``path``; the status code (the body is read and dropped)."""
        assert self.reader is not None and self.writer is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return int(head[9:12])


class HttpxClient:
    """The same interface over one ``httpx.AsyncClient`` with one connection."""

    def __init__(self, url: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=url, limits=httpx.Limits(max_connections=1), timeout=30
        )

    async def __aenter__(self) -> HttpxClient:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__()

    async def get(self, path: str) -> int:
        return (await self.client.get(path)).status_code


async def _load(url: str, endpoint: str, clients: int, seconds: float, seed: int, kind: str) -> Run:
    latencies: list[float] = []
    errors = 0
    stop_at = 0.0

    async def client(number: int) -> None:
        nonlocal errors
        rng = random.Random(seed * 1000 + number)
        async with RawClient(url) if kind == "raw" else HttpxClient(url) as http:
            await http.get("/_health")  # connected before the clock starts
            await started.wait()
            while time.perf_counter() < stop_at:
                path = endpoint_path(endpoint, rng)
                begin = time.perf_counter()
                status = await http.get(path)
                latencies.append((time.perf_counter() - begin) * 1000)
                if status != 200:
                    errors += 1

    started = asyncio.Event()
    tasks = [asyncio.create_task(client(n)) for n in range(clients)]
    await asyncio.sleep(0.3)
    cpu, begin = time.process_time(), time.perf_counter()
    stop_at = begin + seconds
    started.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - begin
    return Run(len(latencies), errors, elapsed, time.process_time() - cpu, latencies)


def load(url: str, endpoint: str, clients: int, seconds: float, seed: int, kind: str) -> Run:
    """Entry point of a load process."""
    return asyncio.run(_load(url, endpoint, clients, seconds, seed, kind))


def health(server: Server) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(f"{server.url}/_health").json()
    return result


def warm(server: Server) -> None:
    """Every product page and list page once, 64 at a time."""
    paths = [f"/products/{pid}" for pid in range(1, PRODUCTS + 1)]
    paths += [
        f"/products?category_id={c}&offset={o}" for c in range(1, 21) for o in range(0, 100, 20)
    ]
    paths += [f"/search?q={w}" for w in WORDS] + [f"/top?n={n}" for n in (5, 10, 20)]

    async def run() -> None:
        queue = iter(paths)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:

            async def worker() -> None:
                for path in queue:
                    (await http.get(path)).raise_for_status()

            await asyncio.gather(*(worker() for _ in range(64)))

    asyncio.run(run())


def measure(
    pool: ProcessPoolExecutor,
    server: Server,
    endpoint: str,
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Any]:
    """One timed run; returns its figures (the run's latencies are kept for percentiles)."""
    share = [args.clients // args.load_processes] * args.load_processes
    share[0] += args.clients - sum(share)
    before_sql, before_cpu = health(server)["statements"], cpu_seconds(server.process.pid)
    before_busy = machine_busy_seconds()
    futures = [
        pool.submit(load, server.url, endpoint, n, args.seconds, seed * 10 + i, args.client)
        for i, n in enumerate(share)
    ]
    runs = [future.result() for future in futures]
    server_cpu = cpu_seconds(server.process.pid) - before_cpu
    busy = machine_busy_seconds() - before_busy
    sql = health(server)["statements"] - before_sql
    requests = sum(r.requests for r in runs)
    seconds = max(r.seconds for r in runs)
    return {
        "rps": requests / seconds,
        "requests": requests,
        "errors": sum(r.errors for r in runs),
        "server_cpu": server_cpu / seconds,
        "client_cpu": sum(r.client_cpu for r in runs) / seconds,
        "other_cpu": max(0.0, busy - server_cpu - sum(r.client_cpu for r in runs)) / seconds,
        "sql_per_request": sql / requests if requests else 0.0,
        "latencies_ms": [latency for r in runs for latency in r.latencies_ms],
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    rows = []
    for endpoint, variants in samples.items():
        row: dict[str, Any] = {"endpoint": endpoint}
        for variant, runs in variants.items():
            latencies = [latency for run in runs for latency in run["latencies_ms"]]
            row[variant] = {
                "rps": round(statistics.median(run["rps"] for run in runs), 1),
                "rps_runs": [round(run["rps"], 1) for run in runs],
                "p50_ms": round(percentile(latencies, 0.50), 2),
                "p99_ms": round(percentile(latencies, 0.99), 2),
                "errors": sum(run["errors"] for run in runs),
                "sql_per_request": round(statistics.mean(r["sql_per_request"] for r in runs), 2),
                "server_cpu": round(statistics.mean(r["server_cpu"] for r in runs), 2),
                "client_cpu": round(statistics.mean(r["client_cpu"] for r in runs), 2),
                "other_cpu": round(statistics.mean(r["other_cpu"] for r in runs), 2),
            }
        row["ratio"] = round(row["cached"]["rps"] / row["uncached"]["rps"], 2)
        row["target"] = TARGET if endpoint in GATED else None
        row["passed"] = row["ratio"] >= TARGET if endpoint in GATED else None
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], write: Callable[[str], object] = print) -> None:
    head = (
        f"{'endpoint':<8} {'variant':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'SQL/req':>7} {'srv CPU':>7} {'cli CPU':>7} {'other':>6} {'errors':>6}  ratio"
    )
    write(head)
    write("-" * len(head))
    for row in rows:
        for variant in ("uncached", "cached"):
            v = row[variant]
            ratio = ""
            if variant == "cached":
                verdict = {True: "PASS", False: "FAIL", None: "info"}[row["passed"]]
                goal = f">= {row['target']:.0f}x " if row["target"] else ""
                ratio = f"{row['ratio']:.2f}x {goal}{verdict}"
            write(
                f"{row['endpoint']:<8} {variant:<8} {v['rps']:>8.0f} {v['p50_ms']:>8.2f} "
                f"{v['p99_ms']:>8.2f} {v['sql_per_request']:>7.2f} {v['server_cpu']:>6.0%} "
                f"{v['client_cpu']:>6.0%} {v['other_cpu']:>6.0%} {v['errors']:>6}  {ratio}"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, never gate (CI)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--seconds", type=float, help="length of one timed run")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per endpoint")
    parser.add_argument("--load-processes", type=int, default=1, help="load generator processes")
    parser.add_argument(
        "--stack",
        choices=STACKS,
        default="auto",
        help="uvicorn's HTTP parser and event loop: auto = uvicorn's defaults (httptools + "
        "uvloop when installed, as .[test] does), plain = h11 + asyncio, fast = httptools + "
        "uvloop",
    )
    parser.add_argument(
        "--client", choices=("raw", "httpx"), default="raw", help="load generator's HTTP client"
    )
    parser.add_argument(
        "--endpoints",
        default=",".join(ENDPOINTS),
        help=f"comma-separated subset of {','.join(ENDPOINTS)}",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results path")
    args = parser.parse_args()
    args.seconds = args.seconds or (1.0 if args.quick else 4.0)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.stack == "fast" and not all(map(importlib.util.find_spec, ("httptools", "uvloop"))):
        parser.error("--stack fast needs httptools and uvloop: pip install 'uvicorn[standard]'")
    args.endpoints = [e for e in ENDPOINTS if e in args.endpoints.split(",")]
    if not args.endpoints:
        parser.error(f"--endpoints: choose from {', '.join(ENDPOINTS)}")
    return args


def main() -> int:
    args = parse_args()
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        endpoint: {"uncached": [], "cached": []} for endpoint in args.endpoints
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with (
            serve(
                f"sqlite+aiosqlite:///{work / 'cached.db'}",
                work / "cached.log",
                uvicorn_args=STACKS[args.stack],
            ) as cached,
            serve(
                f"sqlite+aiosqlite:///{work / 'uncached.db'}",
                work / "uncached.log",
                cached=False,
                uvicorn_args=STACKS[args.stack],
            ) as uncached,
            ProcessPoolExecutor(args.load_processes) as pool,
        ):
            servers = {"cached": cached, "uncached": uncached}
            for server in servers.values():
                warm(server)
            for repeat in range(args.repeats):
                order = ["uncached", "cached"] if repeat % 2 == 0 else ["cached", "uncached"]
                for endpoint in args.endpoints:
                    for variant in order:
                        run = measure(pool, servers[variant], endpoint, args, seed=repeat)
                        samples[endpoint][variant].append(run)
            idle = {variant: health(server) for variant, server in servers.items()}
    rows = summarize(samples)
    print(
        f"catalogue on uvicorn ({stack_label(args.stack)}, 1 worker) + aiosqlite; "
        f"{args.clients} {args.client} clients in {args.load_processes} load process(es); "
        f"{args.repeats} x {args.seconds:.0f} s per endpoint and variant; "
        f"{os.cpu_count()} CPUs\n"
    )
    print_table(rows)
    print(
        "\nSQL/req: statements the server sent per request. srv/cli CPU: share of one core "
        "used by the server and by the load process(es); other: by everything else on the "
        "machine (other work competes with the server for the 2 cores)."
    )
    bad = [row["endpoint"] for row in rows if row["cached"]["errors"] or row["uncached"]["errors"]]
    leaks = {v: (h["sessions"], h["checked_out"]) for v, h in idle.items()}
    failed = [row["endpoint"] for row in rows if row["passed"] is False]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "mode": "quick" if args.quick else "default",
                "stack": stack_label(args.stack),
                "client": args.client,
                "clients": args.clients,
                "load_processes": args.load_processes,
                "seconds": args.seconds,
                "repeats": args.repeats,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "idle_after": leaks,
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {args.output}")
    if bad or any(leak != (0, 0) for leak in leaks.values()):
        print(f"errors on {bad}; sessions/connections left open after the runs: {leaks}")
        return 2
    if failed:
        print(f"below the {TARGET:.0f}x target: {', '.join(failed)}")
        return 0 if args.quick else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
