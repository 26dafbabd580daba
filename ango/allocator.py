"""The embedded API: ``ango.Allocator`` (work in progress; the contract below is fixed).

    async with ango.Allocator(dsn=None, *, shards=None, data_dir=None) as alloc:
        code = await alloc.claim(batch_id, customer_id, *, client_id=None, request_id=None)
        await alloc.expire(batch_id)          # -> bool (False if already expired)
        batches = await alloc.batches()       # list[dict], same fields as `ango batches --json`
        stats = await alloc.stats()           # dict: shards_alive, in_flight, claims_served, leases_held, ...
"""
