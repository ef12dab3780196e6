"""Run the catalogue under a real uvicorn process on 127.0.0.1 (for tests and benchmarks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


class ServerFailed(RuntimeError):
    """The server did not come up (its log tail is in the message)."""


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def rss_bytes(self) -> int:
        """The server process's resident set size (Linux ``VmRSS``)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve(
    database_url: str,
    log: Path,
    *,
    cached: bool = True,
    uvicorn_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> Iterator[Server]:
    """Start ``uvicorn examples.catalogue.app:app`` (one worker) on a free port, wait until
    ``/_health`` answers, yield it, and stop it with SIGTERM (graceful shutdown).
    ``uvicorn_args`` are added to the command line (e.g. ``--http h11``)."""
    env = {
        **os.environ,
        "CATALOGUE_DATABASE_URL": database_url,
        "CATALOGUE_CACHED": "1" if cached else "0",
    }
    for _attempt in range(3):  # a free port can be taken before uvicorn binds it
        port = _free_port()
        argv = [sys.executable, "-m", "uvicorn", "examples.catalogue.app:app"]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        argv += ["--no-access-log", "--log-level", "info", *uvicorn_args]
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        server = Server(f"http://127.0.0.1:{port}", process, log)
        try:
            if _wait_ready(server, timeout):
                yield server
                return
        finally:
            _stop(process)
    raise ServerFailed(f"uvicorn did not start; log:\n{server.log_text()[-3000:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(server: Server, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False
            try:
                if client.get("/_health").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise ServerFailed(f"uvicorn not ready after {timeout} s; log:\n{server.log_text()[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
