"""Rules JSON: what is accepted, what is refused and why, and the registry."""

from __future__ import annotations

import pytest

from ango.errors import InvalidInput
from ango.rules import REGISTRY, MaxPerCustomer, Rules, parse_rules

# Every wrong shape, with a fragment of the message that names the problem.
BAD_RULES_WITH_REASONS = [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "must be a JSON object or null, got list"),
    ('"text"', "must be a JSON object or null, got str"),
    ("3", "must be a JSON object or null, got int"),
    ("true", "must be a JSON object or null, got bool"),
    ('{"maxpercustomer": 0}', "'maxpercustomer' must be between 1"),
    ('{"maxpercustomer": -1}', "'maxpercustomer' must be between 1"),
    ('{"maxpercustomer": 2147483648}', "'maxpercustomer' must be between 1"),
    ('{"maxpercustomer": 10001}', "'maxpercustomer' is at most 10000"),
    ('{"maxpercustomer": 1.5}', "'maxpercustomer' must be a whole number"),
    ('{"maxpercustomer": 2.0}', "'maxpercustomer' must be a whole number"),
    ('{"maxpercustomer": "2"}', "'maxpercustomer' must be a whole number"),
    ('{"maxpercustomer": true}', "'maxpercustomer' must be a whole number"),
    ('{"maxpercustomer": null}', "'maxpercustomer' must be a whole number"),
    ('{"maxpercustomer": [2]}', "'maxpercustomer' must be a whole number"),
    ('{"maxpercustomer": {"n": 2}}', "'maxpercustomer' must be a whole number"),
    ('{"timelimit": 30}', "'timelimit' needs 'maxpercustomer'"),
    ('{"maxpercustomer": 2, "timelimit": 0}', "'timelimit' must be between 1"),
    ('{"maxpercustomer": 2, "timelimit": -7}', "'timelimit' must be between 1"),
    ('{"maxpercustomer": 2, "timelimit": 36501}', "'timelimit' is at most 36500 days"),
    ('{"maxpercustomer": 2, "timelimit": "30"}', "'timelimit' must be a whole number"),
    ('{"maxpercustomer": 2, "timelimit": 1.5}', "'timelimit' must be a whole number"),
    ('{"maxpercustomer": 2, "bogus": 1}', "unknown key 'bogus'"),
    ('{"MaxPerCustomer": 2}', "unknown key 'MaxPerCustomer'"),
]
BAD_RULES = [text for text, _reason in BAD_RULES_WITH_REASONS]


@pytest.mark.parametrize(("text", "reason"), BAD_RULES_WITH_REASONS)
def test_bad_rules_are_refused_with_a_reason(text, reason):
    with pytest.raises(InvalidInput) as failure:
        parse_rules(text)
    assert str(failure.value).startswith("rules: ")
    assert reason in str(failure.value)


@pytest.mark.parametrize("value", [None, "null", {}, "{}"])
def test_no_rules_means_no_limit(value):
    parsed = parse_rules(value)
    assert parsed == Rules()
    assert parsed.per_customer is None
    assert parsed.to_json() is None


def test_limit_without_timelimit_is_unlimited_in_time():
    rule = parse_rules('{"maxpercustomer": 2}').per_customer
    assert rule == MaxPerCustomer(2, None)
    assert rule.window_seconds is None


def test_timelimit_null_is_the_same_as_absent():
    assert parse_rules('{"maxpercustomer": 2, "timelimit": null}').per_customer == MaxPerCustomer(
        2, None
    )


def test_limit_with_timelimit_is_a_rolling_window_in_days():
    rule = parse_rules({"maxpercustomer": 3, "timelimit": 30}).per_customer
    assert rule == MaxPerCustomer(3, 30)
    assert rule.window_seconds == 30 * 86400


def test_bounds_are_inclusive():
    assert parse_rules('{"maxpercustomer": 1, "timelimit": 1}').per_customer == MaxPerCustomer(
        1, 1
    )
    assert parse_rules(
        '{"maxpercustomer": 10000, "timelimit": 36500}'
    ).per_customer == MaxPerCustomer(10000, 36500)


def test_rules_round_trip_to_canonical_json():
    text = '{"timelimit": 7, "maxpercustomer": 5}'
    assert parse_rules(text).to_json() == {"maxpercustomer": 5, "timelimit": 7}
    assert parse_rules(parse_rules(text).to_json()) == parse_rules(text)
    assert parse_rules('{"maxpercustomer": 5}').to_json() == {"maxpercustomer": 5}


def test_every_registered_rule_owns_distinct_keys():
    keys = [key for rule in REGISTRY for key in rule.keys]
    assert len(keys) == len(set(keys))
    assert "maxpercustomer" in keys and "timelimit" in keys
