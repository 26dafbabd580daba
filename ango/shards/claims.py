"""The claims in a shard's hands, and what the shard knows of their batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class BatchMeta:
    """What the shard knows of a batch."""

    key: int
    client_id: str
    limit: int | None
    window: float | None
    expired: bool


class Pending:
    """A claim in the shard's hands (a plain slotted class: one is made per claim)."""

    __slots__ = ("tag", "batch_id", "customer_id", "client_id", "request_id", "received",
                 "attempts", "meta", "slot", "code", "lease", "followers", "rivals", "direct")

    def __init__(self, tag: int, batch_id: str, customer_id: str, client_id: str | None,
                 request_id: str, received: float) -> None:
        self.tag = tag
        self.batch_id = batch_id
        self.customer_id = customer_id
        self.client_id = client_id
        self.request_id = request_id
        self.received = received
        self.attempts = 0
        self.meta: BatchMeta | None = None
        self.slot: int | None = None
        self.code: str | None = None
        self.lease = 0
        self.followers: list[Pending] = []  # same batch, request id and customer
        self.rivals: list[Pending] = []  # same batch and request id, another customer
        #: The client connection handed to this shard that sent the claim (None:
        #: it came from the Allocator); ``tag`` is then the request's protocol id.
        self.direct: Any = None
