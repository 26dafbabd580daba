"""The routing slot space and the fair share of it each live instance owns."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

#: The hash a claim is routed by, as docs/PROTOCOL.md states it for other languages.
HASH_DEFINITION = ("crc32(utf8(batch_id + '/' + customer_id)) % slots, batch_id in "
                   "lower-case 8-4-4-4-12 form; crc32 as zlib's (IEEE 802.3)")


def slot_of(batch_id: str, customer_id: str, slots: int) -> int:
    """The routing slot of a customer in a batch (``batch_id`` canonical UUID text)."""
    return zlib.crc32(f"{batch_id}/{customer_id}".encode()) % slots


def fair_shares(live: list[str], slots: int) -> dict[str, int]:
    """How many slots each live instance should own: equal, the first ones one more."""
    names = sorted(live)
    if not names:
        return {}
    base, extra = divmod(slots, len(names))
    return {name: base + (1 if i < extra else 0) for i, name in enumerate(names)}


@dataclass
class Plan:
    """What one instance does this beat: slots to take, and slots to hand to whom."""

    take: list[int] = field(default_factory=list)
    give: dict[str, list[int]] = field(default_factory=dict)


def plan(me: str, owners: list[str | None], live: list[str]) -> Plan:
    """Move ``me`` toward its fair share.

    ``owners``: each slot's owner (None: none); ``live``: live instance names
    (``me`` among them). Below its share, an instance takes slots without a live
    owner; above it, and only once no slot is ownerless, it hands its excess to
    the live instances below theirs.
    """
    slots = len(owners)
    shares = fair_shares(live, slots)
    alive = set(live)
    mine = [s for s, o in enumerate(owners) if o == me]
    free = [s for s, o in enumerate(owners) if o is None or o not in alive]
    result = Plan()
    want = shares.get(me, 0) - len(mine)
    if want > 0 and free:
        # Start at a point of our own so that newcomers rarely race for one slot.
        start = sorted(live).index(me) * slots // max(1, len(live))
        ordered = sorted(free, key=lambda s: (s - start) % slots)
        result.take = ordered[:want]
    elif want < 0 and not free:
        held: dict[str, int] = {name: 0 for name in live}
        for o in owners:
            if o in held:
                held[o] += 1
        excess = list(reversed(mine))[:-want]
        for name in sorted(live):
            deficit = shares[name] - held[name]
            if name == me or deficit <= 0 or not excess:
                continue
            given, excess = excess[:deficit], excess[deficit:]
            result.give[name] = given
    return result
