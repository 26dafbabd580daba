"""Codes leased into a shard's memory, per batch, with the lease each came from.

A lease's ``remaining`` counts its codes not yet known to be issued (held here or
in a group commit in flight); when it reaches zero the lease row can be deleted.
"""

from __future__ import annotations

from collections import deque


class CodePool:
    """The shard's leased, unissued codes."""

    def __init__(self) -> None:
        self._codes: dict[int, deque[tuple[str, int]]] = {}
        self._remaining: dict[int, int] = {}
        self._lease_batch: dict[int, int] = {}
        self._block: dict[int, int] = {}

    def add_lease(self, lease_id: int, batch_key: int, codes: list[str]) -> None:
        """Hold the unissued codes of a lease (new, adopted or stolen)."""
        queue = self._codes.setdefault(batch_key, deque())
        queue.extend((code, lease_id) for code in codes)
        self._remaining[lease_id] = self._remaining.get(lease_id, 0) + len(codes)
        self._lease_batch[lease_id] = batch_key

    def take(self, batch_key: int) -> tuple[str, int] | None:
        """A code of the batch and its lease id, or None when none is held."""
        queue = self._codes.get(batch_key)
        if queue:
            return queue.popleft()
        return None

    def put_back(self, batch_key: int, code: str, lease_id: int) -> None:
        """Return a code that was not issued, to be handed out first."""
        if lease_id in self._remaining:
            self._codes.setdefault(batch_key, deque()).appendleft((code, lease_id))

    def spent(self, lease_id: int) -> bool:
        """A code of the lease is gone (issued); True when the lease is used up."""
        left = self._remaining.get(lease_id)
        if left is None:
            return False
        left -= 1
        if left <= 0:
            del self._remaining[lease_id]
            self._lease_batch.pop(lease_id, None)
            return True
        self._remaining[lease_id] = left
        return False

    def drop_lease(self, lease_id: int) -> None:
        """Forget a lease we no longer own and its codes."""
        batch_key = self._lease_batch.pop(lease_id, None)
        self._remaining.pop(lease_id, None)
        if batch_key is not None and batch_key in self._codes:
            self._codes[batch_key] = deque(c for c in self._codes[batch_key] if c[1] != lease_id)

    def drop_batch(self, batch_key: int) -> list[int]:
        """Forget everything of a batch (it expired); return its lease ids."""
        self._codes.pop(batch_key, None)
        leases = [lid for lid, bk in self._lease_batch.items() if bk == batch_key]
        for lease_id in leases:
            self._remaining.pop(lease_id, None)
            del self._lease_batch[lease_id]
        return leases

    def held(self, batch_key: int) -> int:
        """How many codes of the batch are held."""
        queue = self._codes.get(batch_key)
        return len(queue) if queue else 0

    def next_block(self, batch_key: int, maximum: int) -> int:
        """The size of the next lease: doubles per lease of the batch, up to ``maximum``."""
        size = min(self._block.get(batch_key, 64) * 2, maximum)
        self._block[batch_key] = size
        return size

    @property
    def codes_held(self) -> int:
        """Codes held across batches."""
        return sum(len(q) for q in self._codes.values())

    @property
    def leases_held(self) -> int:
        """Leases with codes not yet issued."""
        return len(self._remaining)
