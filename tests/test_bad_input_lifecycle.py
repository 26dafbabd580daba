"""The bad-input matrix for the messages of the life of a batch and of a code (lookup,
customer_codes, set_rules, set_schedule, delete): every bad field on the wire is a typed
error for that request id, the connection stays open, and nothing in the database changes."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.hostile import module_dsn  # noqa: F401 (a fixture)
from tests.test_bad_input import (
    BAD_TEXT,
    BAD_UUIDS,
    MIB,
    UNKNOWN,
    WRONG_TYPES,
    case_id,
    env,  # noqa: F401 (a fixture)
    refused_on_the_wire,
)

NOT_STR = [v for v in WRONG_TYPES if not isinstance(v, str)]
BAD_TIMES = ["tomorrow", "2030-01-01T00:00:00", "2030-13-01T00:00:00Z", "2000-01-01T00:00:00Z",
             *NOT_STR]
BAD_RULES = [0, "x", [], {"nope": 1}, {"maxpercustomer": "1"}, {"maxpercustomer": 0},
             {"timelimit": 3}, {"maxpercustomer": 1, "timelimit": -1}]

#: (request type, field, value, error code); "LIVE"/"GONE" stand for the fixture's batches.
CASES = (
    [("lookup", "code", v, "invalid_input") for v in ["", "x" * 257, "a\x00b", *NOT_STR, None]]
    + [("lookup", "code", MIB, "protocol")]
    + [("customer_codes", "customer_id", v, "invalid_input") for v in [*BAD_TEXT, *NOT_STR]]
    + [("customer_codes", "batch_id", v, "invalid_input") for v in [*BAD_UUIDS, *NOT_STR]]
    + [("customer_codes", "limit", v, "invalid_input") for v in [0, -1, 51, 1.5, "1", None]]
    + [("set_rules", "batch_id", v, "invalid_input") for v in [*BAD_UUIDS, *NOT_STR, None]]
    + [("set_rules", "batch_id", UNKNOWN, "batch_not_found"),
       ("set_rules", "batch_id", "GONE", "batch_expired")]
    + [("set_rules", "rules", v, "invalid_input") for v in BAD_RULES]
    + [("set_schedule", "batch_id", v, "invalid_input") for v in [*BAD_UUIDS, *NOT_STR]]
    + [("set_schedule", "batch_id", UNKNOWN, "batch_not_found"),
       ("set_schedule", "batch_id", "GONE", "batch_expired")]
    + [("set_schedule", "starts_at", v, "invalid_input") for v in BAD_TIMES]
    + [("set_schedule", "expires_at", v, "invalid_input") for v in BAD_TIMES]
    + [("delete", "batch_id", v, "invalid_input") for v in [*BAD_UUIDS, *NOT_STR, None]]
    + [("delete", "batch_id", UNKNOWN, "batch_not_found"),
       ("delete", "batch_id", "LIVE", "invalid_input")]
    + [("delete", "purge", v, "invalid_input") for v in ["yes", 1, None, []]]
)

GOOD = {
    "lookup": {"code": "some-code"},
    "customer_codes": {"customer_id": "cust"},
    "set_rules": {"batch_id": "LIVE", "rules": {"maxpercustomer": 1}},
    # A start later than the end, whatever the other field holds, is refused too.
    "set_schedule": {"batch_id": "LIVE"},
    "delete": {"batch_id": "GONE"},
}


def batches_state(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT id, rules, starts_at, expires_at, expired, total, rules_changed_at, "
            "(SELECT count(*) FROM ango.codes) FROM ango.batches ORDER BY key").fetchall()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}:{case_id(c[1:])}")
def test_a_bad_lifecycle_request_is_refused_and_changes_nothing(env, module_dsn, case):  # noqa: F811
    srv, live, gone = env
    kind, field, value, code = case
    message: dict[str, Any] = {"type": kind, "id": 11, **GOOD[kind], field: value}
    for key, val in message.items():
        message[key] = {"LIVE": live, "GONE": gone}.get(val, val) if isinstance(val, str) else val
    before = batches_state(module_dsn)
    refused_on_the_wire(srv, message, code, module_dsn)
    assert batches_state(module_dsn) == before


def test_a_schedule_ending_before_it_starts_is_refused(env, module_dsn):  # noqa: F811
    srv, live, _ = env
    before = batches_state(module_dsn)
    refused_on_the_wire(srv, {"type": "set_schedule", "id": 12, "batch_id": live,
                              "expires_at": "2098-01-01T00:00:00Z",
                              "starts_at": "2099-01-01T00:00:00Z"}, "invalid_input", module_dsn)
    assert batches_state(module_dsn) == before
