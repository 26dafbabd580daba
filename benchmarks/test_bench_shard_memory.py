"""pytest-benchmark: a claim served from a shard's memory, 1,000 at a time.

    .venv/bin/python -m pytest benchmarks/test_bench_shard_memory.py --benchmark-enable

What a shard does per claim before and after its group commit, without the
database: reserve the customer's rule slot (``CustomerCounters.reserve``), take a
leased code (``CodePool.take``), and once committed release the slot as taken
and count the code spent from its lease (``release``, ``spent``).
"""

from __future__ import annotations

import time

from ango.shards.counters import CustomerCounters
from ango.shards.pool import CodePool

CLAIMS = 1000
BATCH_KEY = 1
LEASE_SIZE = 8192


def _pool() -> CodePool:
    pool = CodePool()
    for lease in range(1, 3):
        pool.add_lease(lease, BATCH_KEY, [f"{lease:02d}{i:014X}" for i in range(LEASE_SIZE)])
    return pool


def test_bench_in_memory_claims_1000(benchmark):
    customers = [f"customer-{i}" for i in range(CLAIMS)]

    def setup():
        return (_pool(), CustomerCounters()), {}

    def serve(pool: CodePool, counters: CustomerCounters) -> int:
        now = time.time()
        served = 0
        for customer in customers:
            key = (BATCH_KEY, customer)
            slot = counters.reserve(key, 1, None, now)  # rule: maxpercustomer 1
            code, lease = pool.take(BATCH_KEY)
            counters.release(key, slot, now)          # after the commit: the slot is taken
            pool.spent(lease)
            served += code is not None
        return served

    assert benchmark.pedantic(serve, setup=setup, rounds=200, iterations=1) == CLAIMS


def test_bench_take_and_spend_1000_no_rule(benchmark):
    def setup():
        return (_pool(),), {}

    def serve(pool: CodePool) -> int:
        for _ in range(CLAIMS):
            _, lease = pool.take(BATCH_KEY)
            pool.spent(lease)
        return pool.held(BATCH_KEY)

    assert benchmark.pedantic(serve, setup=setup, rounds=200, iterations=1) == \
        2 * LEASE_SIZE - CLAIMS
