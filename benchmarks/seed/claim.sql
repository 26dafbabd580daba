-- The original's claim, one transaction per claim (pgbench script; -M prepared,
-- -D batch=UUID -D client=UUID). A fresh customer per claim.
BEGIN;
SELECT code FROM seed.codes WHERE batch_id = :batch AND client_id = :client AND customer_id IS NULL FOR NO KEY UPDATE SKIP LOCKED LIMIT 1 \gset
UPDATE seed.codes SET customer_id = gen_random_uuid() WHERE code = :code;
COMMIT;
