"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import io
import uuid

from ango.importer import import_codes

CLIENT = "c0ffee00-0000-4000-8000-000000000001"


def make_batch(dsn: str, count: int, rules: dict | None = None, prefix: str | None = None,
               client: str = CLIENT) -> str:
    """Import ``count`` fresh codes as a new batch; return its id."""
    prefix = prefix or uuid.uuid4().hex[:8]
    body = "code\n" + "".join(f"{prefix}-{i:07d}\n" for i in range(count))
    result = import_codes(dsn, io.BytesIO(body.encode()), client, f"batch {prefix}", rules)
    return str(result.batch_id)


def run(coro):
    """Run a coroutine on a fresh event loop."""
    return asyncio.run(coro)


async def gather_outcomes(awaitables) -> list:
    """Results or exceptions, in order."""
    return await asyncio.gather(*awaitables, return_exceptions=True)
