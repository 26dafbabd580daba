def test_fresh_database_has_the_schema_and_partitions(db):
    parts = db.execute(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'ango.codes'::regclass"
    ).fetchone()[0]
    assert parts == 16
    assert db.execute("SELECT value FROM ango.meta WHERE key = 'partitions'").fetchone()[0] == "16"
