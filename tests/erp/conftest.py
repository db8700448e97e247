"""Fixtures for the bridge's tests: a stockward schema in the real Postgres."""

from collections.abc import AsyncIterator

import asyncpg
import pytest

from server.wal.schema import ensure_schema
from tests.conftest import DATABASE_URL

# The shard count of schemas made here; the reader and store take any.
SHARDS = 3


@pytest.fixture
async def pool(schema: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh schema holding stockward's tables, as a server makes them."""
    admin = await asyncpg.connect(DATABASE_URL)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await admin.close()
    pool_ = await asyncpg.create_pool(
        DATABASE_URL,
        min_size=1,
        max_size=6,
        server_settings={"search_path": schema},
    )
    async with pool_.acquire() as conn:
        await ensure_schema(conn, shard_count=SHARDS)
    yield pool_
    await pool_.close()
