"""Project-wide test infrastructure: real redis-server and PostgreSQL servers started by the tests.

Without ``--require-services`` a test whose server cannot be started is skipped with the reason;
with it (``make test REQUIRE_SERVICES=1``, as CI runs) that test fails instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from typing import TypeVar

import pytest

from tests.services import (
    PostgresServer,
    RedisServer,
    ServiceUnavailable,
    find_postgres_bindir,
    find_redis_server,
    run_postgres,
    run_redis,
)

T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-services",
        action="store_true",
        default=False,
        help="fail (instead of skip) tests whose redis-server/PostgreSQL cannot be started",
    )


def pytest_report_header(config: pytest.Config) -> str:
    required = "required" if config.getoption("--require-services") else "optional (skip if absent)"
    redis, postgres = find_redis_server() or "missing", find_postgres_bindir() or "missing"
    return f"services {required}: redis-server={redis}, postgres={postgres}"


def _start(request: pytest.FixtureRequest, server: AbstractContextManager[T]) -> Iterator[T]:
    with ExitStack() as stack:
        try:
            running = stack.enter_context(server)
        except ServiceUnavailable as exc:
            reason = str(exc)
        else:
            yield running
            return
    if request.config.getoption("--require-services"):
        pytest.fail(f"required service unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A redis-server on 127.0.0.1 for the whole session (``.host``, ``.port``, ``.url``)."""
    yield from _start(request, run_redis())


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """A PostgreSQL on 127.0.0.1 for the whole session; ``.create_database()`` gives a fresh one."""
    yield from _start(request, run_postgres())
