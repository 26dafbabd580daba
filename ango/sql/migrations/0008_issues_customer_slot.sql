-- One index for two jobs (issue 12): `ango customer` finds a customer's codes
-- by its leading column (issue 14, was issues_customer), and it is unique, so
-- it holds I4 for rules without a window (was the partial issues_rule_slot):
-- rows without a slot never conflict, NULLs being distinct. Every issue paid
-- for both indexes in the group commit; one fewer index is about a tenth less
-- PostgreSQL CPU per claim (benchmarks/test_bench_group_commit).
CREATE UNIQUE INDEX IF NOT EXISTS issues_customer_slot
    ON ango.issues (customer_id, batch_key, slot);
DROP INDEX IF EXISTS ango.issues_customer;
DROP INDEX IF EXISTS ango.issues_rule_slot;
