-- The original service's codes table, as its per-claim transaction uses it:
-- one row per code, a customer written into the row when it is claimed.
-- Indexes: the code is unique, and available codes of a (batch, client) are
-- found through a partial index, the kindest choice for the original's
-- SELECT ... WHERE customer_id IS NULL (it never walks past claimed rows).
CREATE SCHEMA seed;
CREATE TABLE seed.codes (
    batch_id     uuid NOT NULL,
    client_id    uuid NOT NULL,
    code         text NOT NULL,
    customer_id  uuid
);
