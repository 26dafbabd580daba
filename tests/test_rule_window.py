"""A rule's ``timelimit`` is N × 24 hours everywhere (claims, counters, audit),
whatever the database's time zone and its daylight-saving changes."""

from __future__ import annotations

import datetime
import subprocess

import psycopg
import pytest
from psycopg import sql

import ango
from ango.audit import violations
from tests.helpers import gather_outcomes, make_batch, run
from tests.servers import ANGO

DAYS = 30
WINDOW_S = DAYS * 86400


def zone_with_a_change(days_ago: int, forward: bool) -> str:
    """A POSIX time zone like New York's (EST5EDT) whose clocks changed ``days_ago`` days ago.

    Forward (spring) makes the last DAYS calendar days an hour shorter than
    DAYS × 24 hours, back (autumn) an hour longer. A real zone's last change
    may be months old and its direction depends on the day the test runs.
    """
    today = datetime.datetime.now(datetime.UTC).date()

    def day_of_year(d: datetime.date) -> int:  # POSIX "n": zero-based, leap days counted
        return d.timetuple().tm_yday - 1

    change = day_of_year(today - datetime.timedelta(days=days_ago))
    other = day_of_year(today + datetime.timedelta(days=120))
    start, end = (change, other) if forward else (other, change)
    return f"EST5EDT,{start}/2,{end}/2"


def set_time_zone(dsn: str, zone: str) -> float:
    """Set the database's TimeZone; return how much longer DAYS calendar days are, in seconds."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        conn.execute(sql.SQL("ALTER DATABASE {} SET TimeZone = {}").format(
            sql.Identifier(name), sql.Literal(zone)))
    with psycopg.connect(dsn) as conn:  # a new session sees the database's setting
        return conn.execute(
            "SELECT extract(epoch FROM now() - (now() - make_interval(days => %s)))::float8 - %s",
            (DAYS, WINDOW_S)).fetchone()[0]


def second_claim_after(dsn: str, age_s: float) -> object:
    """carol's first code, made ``age_s`` seconds old, then a second claim by a fresh allocator."""
    batch = make_batch(dsn, 10, {"maxpercustomer": 1, "timelimit": DAYS})

    async def claim():
        async with ango.Allocator(dsn, shards=1) as alloc:
            return (await gather_outcomes([alloc.claim(batch, "carol")]))[0]

    assert isinstance(run(claim()), str)
    with psycopg.connect(dsn) as conn:
        for table in ("ango.issues", "ango.slots"):
            conn.execute(sql.SQL("UPDATE {} SET issued_at = now() - make_interval(secs => %s)")
                         .format(sql.SQL(table)), (age_s,))
    # A fresh allocator has no counter for carol: the claim statement decides.
    return run(claim())


def assert_audit_clean(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []
    out = subprocess.run([*ANGO, "audit", "--dsn", dsn], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok    I4 rules hold" in out.stdout


def test_a_second_code_is_not_handed_out_early_when_the_clocks_went_forward(dsn):
    assert set_time_zone(dsn, zone_with_a_change(10, forward=True)) == pytest.approx(-3600)
    second = second_claim_after(dsn, WINDOW_S - 1800)  # half an hour short of 30 × 24 h
    assert isinstance(second, ango.RuleViolation), second
    assert_audit_clean(dsn)


def test_a_second_code_is_handed_out_once_the_window_passed_when_the_clocks_went_back(dsn):
    assert set_time_zone(dsn, zone_with_a_change(10, forward=False)) == pytest.approx(3600)
    second = second_claim_after(dsn, WINDOW_S + 1800)  # half an hour past 30 × 24 h
    assert isinstance(second, str), second  # not "unavailable: claim kept conflicting"
    assert_audit_clean(dsn)


@pytest.mark.parametrize("forward", [True, False])
def test_the_audit_counts_the_window_in_24_hour_days_in_any_time_zone(dsn, forward):
    set_time_zone(dsn, zone_with_a_change(10, forward=forward))
    batch = make_batch(dsn, 10, {"maxpercustomer": 1, "timelimit": DAYS})
    with psycopg.connect(dsn) as conn:
        key, codes = conn.execute(
            "SELECT b.key, array_agg(c.code ORDER BY c.seq) FROM ango.batches b "
            "JOIN ango.codes c ON c.batch_key = b.key WHERE b.id = %s GROUP BY b.key",
            (batch,)).fetchone()
        # Two issues 30 × 24 h less a minute apart break the rule; a minute more does not.
        for code, customer, request, age in [(codes[0], "early", "e1", WINDOW_S + 30),
                                             (codes[1], "early", "e2", 30),
                                             (codes[2], "late", "l1", WINDOW_S + 90),
                                             (codes[3], "late", "l2", 30)]:
            conn.execute("INSERT INTO ango.issues (code, batch_key, customer_id, request_id, "
                         "issued_at) VALUES (%s, %s, %s, %s, now() - make_interval(secs => %s))",
                         (code, key, customer, request, age))
        conn.commit()
        broken = violations(conn)
    assert len(broken) == 1 and broken[0].startswith("I4 rules hold")
    assert "'early'" in broken[0] and "'late'" not in broken[0]
