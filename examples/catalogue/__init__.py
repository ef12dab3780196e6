"""A small read-heavy catalogue API on FastAPI + async_session_cache.

    make serve            # .venv/bin/python -m uvicorn examples.catalogue.app:app ...

``CATALOGUE_DATABASE_URL`` picks the database (default: ``./catalogue.db`` on aiosqlite;
PostgreSQL as ``postgresql+asyncpg://...``); ``CATALOGUE_CACHED=0`` serves the same endpoints
without the cache, as the baseline the tests and ``benchmarks/bench_fastapi.py`` compare with.
"""
