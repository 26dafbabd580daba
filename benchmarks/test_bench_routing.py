"""pytest-benchmark: routing a claim to its shard, and the frame that carries claims there.

    .venv/bin/python -m pytest benchmarks/test_bench_routing.py --benchmark-enable

``Allocator.claim`` validates the ids, picks the shard owning
``partition_of(batch, customer)`` and hands it the claim. Here the shards are
sinks that keep what they are given (no process, no database): what is timed
is the Allocator's own share of a claim. Times are per 1,000 claims.
"""

from __future__ import annotations

import asyncio
import uuid

import msgspec

from ango.allocator import Allocator, partition_of
from ango.shards import messages as m

BATCH = str(uuid.UUID(int=0x5F0C6E2A3B7D4C1E9A8F2D4B6C8E0A1F))
PARTITIONS = 16
CLAIMS = 1000


class _Sink:
    """Stands in for a ShardHandle: keeps the claims submitted to it."""

    def __init__(self) -> None:
        self.claims: list[m.Claim] = []

    def submit(self, claim: m.Claim, future: asyncio.Future) -> None:
        self.claims.append(claim)


def _routed_allocator(shards: int = 2) -> tuple[Allocator, list[_Sink]]:
    alloc = Allocator("postgresql:///unused", shards=shards)
    sinks = [_Sink() for _ in range(shards)]
    alloc.partitions = PARTITIONS
    alloc._route = [sinks[p % shards] for p in range(PARTITIONS)]
    alloc._open = True
    return alloc, sinks


def test_bench_partition_of_1000_customers(benchmark):
    customers = [f"customer-{i}" for i in range(CLAIMS)]

    def route():
        return [partition_of(BATCH, c, PARTITIONS) for c in customers]

    assert set(benchmark(route)) == set(range(PARTITIONS))


def test_bench_allocator_claim_routing_1000_claims(benchmark):
    alloc, sinks = _routed_allocator()
    customers = [f"customer-{i}" for i in range(CLAIMS)]
    requests = [uuid.uuid4().hex for _ in range(CLAIMS)]
    loop = asyncio.new_event_loop()

    async def claims():
        for customer, request in zip(customers, requests, strict=True):
            alloc.claim(BATCH, customer, request_id=request)

    try:
        benchmark(lambda: loop.run_until_complete(claims()))
    finally:
        loop.close()
    assert all(s.claims for s in sinks)


def test_bench_encode_claims_frame_1000(benchmark):
    encoder = msgspec.msgpack.Encoder()
    batch = m.Claims([m.Claim(i, BATCH, f"customer-{i}", None, uuid.uuid4().hex)
                      for i in range(CLAIMS)])
    decoder = msgspec.msgpack.Decoder(m.ToShard)
    body = benchmark(encoder.encode, batch)
    assert len(decoder.decode(body).claims) == CLAIMS
