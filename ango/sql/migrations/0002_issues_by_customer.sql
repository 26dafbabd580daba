-- `ango customer`: a customer's codes from an index (issue 14). The issue is the
-- only place a customer is recorded; without an index the look-up would scan
-- every issue. On customer_id alone: every issue pays for this index in the
-- group commit, and (customer_id, issued_at) cost a fifth more per commit than
-- no index where (customer_id) costs a tenth (benchmarks/test_bench_group_commit);
-- a customer's few codes are sorted by time after the index scan.
CREATE INDEX IF NOT EXISTS issues_customer ON ango.issues (customer_id);
