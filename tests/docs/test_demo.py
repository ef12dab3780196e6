"""``make demo`` (``python -m examples.demo``) runs to the end and its checks pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_runs_and_proves_freshness() -> None:
    """The demo exits 0 with identical cached and uncached pages, hits without SQL, and a
    cached read that sees the committed price."""
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "identical pages" in done.stdout
    assert "no SQL" in done.stdout
    assert "OK: the write invalidated the cached price" in done.stdout
