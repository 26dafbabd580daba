"""Batch rules: parsed and validated from the JSON a batch is imported with.

A rule is one class in ``REGISTRY``: it names the JSON keys it owns and parses
them. Today there is one, ``maxpercustomer`` with an optional ``timelimit`` in
days (a rolling window of days of 24 hours, never calendar days: the claim
statements, the shards' counters and the audit all count it so). Enforcement
lives with the claim path: the shard's in-memory counter answers quickly, and
the group commit's slot upsert makes PostgreSQL the arbiter (invariant I4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ango.errors import InvalidInput

SECONDS_PER_DAY = 86400


class Rule:
    """A rule a batch may carry; subclasses own a set of JSON keys."""

    keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def parse(cls, spec: dict[str, Any]) -> Rule:
        """Build the rule from the keys it owns (all present in ``spec``)."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """The JSON keys this rule was parsed from."""
        raise NotImplementedError


def _whole_number(spec: dict[str, Any], key: str, minimum: int) -> int:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"rules: {key!r} must be a whole number, got {value!r}")
    if not minimum <= value <= 2**31 - 1:
        raise InvalidInput(f"rules: {key!r} must be between {minimum} and 2147483647, got {value}")
    return value


@dataclass(frozen=True)
class MaxPerCustomer(Rule):
    """At most ``limit`` codes per customer within a rolling ``window_days`` (None: ever)."""

    keys: ClassVar[tuple[str, ...]] = ("maxpercustomer", "timelimit")
    limit: int
    window_days: int | None = None

    @classmethod
    def parse(cls, spec: dict[str, Any]) -> MaxPerCustomer:
        if "maxpercustomer" not in spec:
            raise InvalidInput("rules: 'timelimit' needs 'maxpercustomer'")
        limit = _whole_number(spec, "maxpercustomer", 1)
        window = None
        if spec.get("timelimit") is not None:
            window = _whole_number(spec, "timelimit", 1)
            if window > 36500:
                raise InvalidInput(f"rules: 'timelimit' is at most 36500 days, got {window}")
        if limit > 10000:
            raise InvalidInput(f"rules: 'maxpercustomer' is at most 10000, got {limit}")
        return cls(limit, window)

    @property
    def window_seconds(self) -> float | None:
        """The window in seconds, or None when unlimited."""
        return None if self.window_days is None else float(self.window_days * SECONDS_PER_DAY)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"maxpercustomer": self.limit}
        if self.window_days is not None:
            out["timelimit"] = self.window_days
        return out


REGISTRY: tuple[type[Rule], ...] = (MaxPerCustomer,)


@dataclass(frozen=True)
class Rules:
    """The parsed rules of one batch."""

    rules: tuple[Rule, ...] = field(default=())

    @property
    def per_customer(self) -> MaxPerCustomer | None:
        """The per-customer limit, if the batch has one."""
        for rule in self.rules:
            if isinstance(rule, MaxPerCustomer):
                return rule
        return None

    def to_json(self) -> dict[str, Any] | None:
        """The canonical JSON, or None for a batch without rules."""
        if not self.rules:
            return None
        out: dict[str, Any] = {}
        for rule in self.rules:
            out.update(rule.to_json())
        return out


def parse_rules(value: str | dict[str, Any] | None) -> Rules:
    """Validate rules given as JSON text, a dict, or None; raise InvalidInput if wrong."""
    if value is None:
        return Rules()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"rules: not valid JSON ({exc.msg} at position {exc.pos})") from None
        except (RecursionError, ValueError) as exc:  # absurd nesting or a 5000-digit number
            raise InvalidInput(f"rules: not acceptable JSON ({type(exc).__name__})") from None
        if value is None:
            return Rules()
    if not isinstance(value, dict):
        raise InvalidInput(f"rules: must be a JSON object or null, got {type(value).__name__}")
    owned = {key: rule for rule in REGISTRY for key in rule.keys}
    unknown = sorted(set(value) - set(owned))
    if unknown:
        raise InvalidInput(
            f"rules: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(owned))}"
        )
    parsed = []
    for rule in REGISTRY:
        spec = {key: value[key] for key in rule.keys if key in value}
        if spec:
            parsed.append(rule.parse(spec))
    return Rules(tuple(parsed))
