"""Throwaway redis-server and PostgreSQL servers for the tests, on 127.0.0.1 only.

Each ``run_*`` context manager either yields a running server or raises ``ServiceUnavailable``
with a reason a person can act on (binary missing, or startup failed plus the server log tail).
The fixtures in ``tests/conftest.py`` turn that into a skip, or a failure under
``--require-services``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
INSTALL_HINT = "run `make test` as root to install it"
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class ServiceUnavailable(Exception):
    """The service cannot be provided here; the message says why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


# ---------------------------------------------------------------------------------------- redis


@dataclass(frozen=True)
class RedisServer:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def find_redis_server() -> str | None:
    return shutil.which("redis-server")


def _redis_pings(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def run_redis(timeout: float = 15.0) -> Iterator[RedisServer]:
    """Run a redis-server without persistence in a temporary directory; stop it on exit."""
    binary = find_redis_server()
    if binary is None:
        raise ServiceUnavailable(f"redis-server not found; {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="asc-redis-") as tmp:
        log_path = Path(tmp, "redis.log")
        for _attempt in range(3):  # a port picked by free_port() can be taken before we bind it
            port = free_port()
            argv = [binary, "--port", str(port), "--bind", HOST, "--protected-mode", "yes"]
            argv += ["--dir", tmp, "--save", "", "--appendonly", "no", "--daemonize", "no"]
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    argv, cwd=tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            try:
                deadline = time.monotonic() + timeout
                while proc.poll() is None and time.monotonic() < deadline:
                    if _redis_pings(port):
                        yield RedisServer(HOST, port)
                        return
                    time.sleep(0.05)
            finally:
                _stop(proc)
            if "Address already in use" not in _tail(log_path):
                break
        raise ServiceUnavailable(
            f"redis-server did not answer PING on {HOST}:{port} (exit code {proc.returncode}); "
            f"log tail:\n{_tail(log_path)}"
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------- postgres


def find_postgres_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``: from PATH, else the newest Debian one."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        real = Path(initdb).resolve().parent  # /usr/local/bin/initdb may link into the Debian dir
        return real if (real / "pg_ctl").exists() else Path(initdb).parent
    candidates = [
        path
        for path in Path("/usr/lib/postgresql").glob("*/bin")
        if (path / "initdb").exists() and (path / "pg_ctl").exists()
    ]

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    return max(candidates, key=version, default=None)


@dataclass
class PostgresServer:
    host: str
    port: int
    bindir: Path

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql+asyncpg://postgres@{self.host}:{self.port}/{name}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a unique name when none is given) and return its URL."""
        name = name or f"test_{os.urandom(6).hex()}"
        self._psql(f'CREATE DATABASE "{_checked(name)}"')
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        self._psql(f'DROP DATABASE IF EXISTS "{_checked(name)}" WITH (FORCE)')

    def _psql(self, sql: str) -> None:
        psql = self.bindir / "psql"
        argv = [str(psql) if psql.exists() else "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        argv += ["-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", "postgres"]
        argv += ["-c", sql]
        subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL)


def _checked(name: str) -> str:
    if not _DB_NAME.fullmatch(name):
        raise ValueError(f"database name must match {_DB_NAME.pattern}: {name!r}")
    return name


def _run(run_as: Sequence[str], argv: Sequence[str], cwd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*run_as, *argv],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextlib.contextmanager
def run_postgres() -> Iterator[PostgresServer]:
    """Run a throwaway PostgreSQL (trust auth, no fsync) in a temporary directory."""
    bindir = find_postgres_bindir()
    if bindir is None:
        raise ServiceUnavailable(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
            f"/usr/lib/postgresql/*/bin; {INSTALL_HINT}"
        )
    run_as: list[str] = []
    tmp = tempfile.mkdtemp(prefix="asc-pg-")
    try:
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise ServiceUnavailable(
                    "running as root and there is no `postgres` OS user to run PostgreSQL as; "
                    "install the Debian postgresql package (run `make test` as root)"
                ) from None
            os.chown(tmp, owner.pw_uid, owner.pw_gid)
            run_as = ["runuser", "-u", "postgres", "--"]
        data, log = Path(tmp, "data"), Path(tmp, "postgres.log")
        initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
        done = _run(run_as, [*initdb, "--no-sync", "-E", "UTF8", "--no-locale"], tmp)
        if done.returncode != 0:
            output = f"{done.stdout}{done.stderr}"
            raise ServiceUnavailable(f"initdb failed ({done.returncode}):\n{output}")
        pg_ctl = str(bindir / "pg_ctl")
        for _attempt in range(3):  # a port picked by free_port() can be taken before we bind it
            port = free_port()
            options = f"-c listen_addresses={HOST} -p {port} -k {shlex.quote(tmp)}"
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            argv = [pg_ctl, "-w", "-t", "60", "-D", str(data), "-o", options, "-l", str(log)]
            done = _run(run_as, [*argv, "start"], tmp)
            if done.returncode == 0:
                break
            _run(run_as, [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], tmp)
            if "already in use" not in _tail(log):
                break
        if done.returncode != 0:
            raise ServiceUnavailable(
                f"pg_ctl start failed ({done.returncode}) on {HOST}:{port}: "
                f"{done.stdout}{done.stderr}\nserver log tail:\n{_tail(log)}"
            )
        try:
            yield PostgresServer(HOST, port, bindir)
        finally:
            _run(run_as, [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
