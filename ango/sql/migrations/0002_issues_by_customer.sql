-- `ango customer`: a customer's codes, newest first, from an index (issue 14).
-- The issue is the only place a customer is recorded; without this index the
-- lookup would scan every issue.
CREATE INDEX IF NOT EXISTS issues_customer ON ango.issues (customer_id, issued_at DESC);
