"""Ango: hands out unique codes to customers at high volume, each exactly once."""

from ango.allocator import Allocator
from ango.errors import (
    AngoError,
    BatchExhausted,
    BatchExpired,
    BatchNotFound,
    InvalidInput,
    RuleViolation,
    Unavailable,
)

__all__ = [
    "Allocator",
    "AngoError",
    "BatchExhausted",
    "BatchExpired",
    "BatchNotFound",
    "InvalidInput",
    "RuleViolation",
    "Unavailable",
]
__version__ = "0.1.0"
