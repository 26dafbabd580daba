"""Ango: hands out unique codes to customers at high volume, each exactly once."""

from ango.allocator import Allocator, SyncAllocator
from ango.client import AsyncClient, Client
from ango.errors import (
    AngoError,
    BatchExhausted,
    BatchExpired,
    BatchNotFound,
    BatchNotStarted,
    InvalidInput,
    RuleViolation,
    Unavailable,
)

__all__ = [
    "Allocator",
    "SyncAllocator",
    "AngoError",
    "AsyncClient",
    "BatchExhausted",
    "BatchExpired",
    "BatchNotFound",
    "BatchNotStarted",
    "Client",
    "InvalidInput",
    "RuleViolation",
    "Unavailable",
]
__version__ = "0.1.0"
