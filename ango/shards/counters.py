"""Per-customer rule counters, local to the shard that owns the customer's partition.

A counter is a cache: it answers the common case (a free slot, or a customer
plainly at the limit) without a round trip. PostgreSQL's slot upsert stays the
arbiter (I4): a stale counter can make a claim retry, never exceed the rule.
"""

from __future__ import annotations

from collections.abc import Callable

WAIT = -1  # every free slot is reserved by a claim in flight: decide after it
FULL = -2  # the customer is at the limit for the current window


class Slots:
    """One customer's slots in one batch."""

    __slots__ = ("times", "reserved")

    def __init__(self, limit: int) -> None:
        # None: free, or not known to be taken (a counter not loaded from the
        # database); either way the slot is tried and the database decides.
        self.times: list[float | None] = [None] * limit
        self.reserved = 0   # bit mask of slots held by claims in flight


class CustomerCounters:
    """Bounded map of (batch key, customer) to their rule slots."""

    def __init__(self, max_entries: int = 500_000) -> None:
        self._entries: dict[tuple[int, str], Slots] = {}
        self._max = max_entries

    def _get(self, key: tuple[int, str], limit: int) -> Slots:
        entry = self._entries.get(key)
        if entry is None or len(entry.times) != limit:
            entry = Slots(limit)
            self._entries[key] = entry
            if len(self._entries) > self._max:
                self._evict()
        return entry

    def _evict(self) -> None:
        for key in list(self._entries)[: self._max // 10]:
            if not self._entries[key].reserved:
                del self._entries[key]

    def reserve(self, key: tuple[int, str], limit: int, window: float | None, now: float) -> int:
        """A free slot for a claim (reserved until ``release``), or WAIT or FULL."""
        entry = self._get(key, limit)
        horizon = None if window is None else now - window
        waiting = False
        for slot, issued in enumerate(entry.times):
            bit = 1 << slot
            if entry.reserved & bit:
                waiting = True
                continue
            if issued is None or (horizon is not None and issued < horizon):
                entry.reserved |= bit
                return slot
        return WAIT if waiting else FULL

    def release(self, key: tuple[int, str], slot: int, issued_at: float | None = None) -> None:
        """End a reservation; ``issued_at`` set when the claim took the slot."""
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.reserved &= ~(1 << slot)
        if issued_at is not None and slot < len(entry.times):
            entry.times[slot] = issued_at

    def load(self, key: tuple[int, str], limit: int, slots: dict[int, float]) -> None:
        """Set a counter from the database's slots."""
        entry = self._get(key, limit)
        entry.times = [slots.get(i) for i in range(limit)]

    def forget_batch(self, batch_key: int) -> None:
        """Drop the counters of a batch whose rule changed."""
        for key in [k for k in self._entries if k[0] == batch_key]:
            del self._entries[key]

    def forget_where(self, chosen: Callable[[tuple[int, str]], bool]) -> None:
        """Drop the counters whose key is ``chosen`` (their routing slot moved away)."""
        for key in [k for k in self._entries if chosen(k)]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
