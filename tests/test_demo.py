import psycopg

from ango.demo import run_demo


def test_demo_serves_a_batch_and_claims_within_the_rule(dsn):
    lines: list[str] = []
    result = run_demo(dsn, shards=1, codes=50, echo=lines.append)
    assert len(result["claimed"]["alice"]) == 2
    assert any("refused (rule_violation" in line for line in lines)
    assert result["issued"] == 4
    with psycopg.connect(dsn) as conn:
        issued = conn.execute("SELECT count(*) FROM ango.issues").fetchone()[0]
    assert issued == 4
