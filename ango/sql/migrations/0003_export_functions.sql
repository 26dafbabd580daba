-- `ango export` (issue 14): the rows of a batch's issued and available codes,
-- one definition each, which the export queries COPY as CSV or JSON lines.
-- Plain SQL functions of one SELECT: PostgreSQL inlines them into the COPY.

CREATE OR REPLACE FUNCTION ango.issued_codes(key integer)
RETURNS TABLE (code text, customer_id text, issued_at text, request_id text)
LANGUAGE sql STABLE AS $$
    SELECT i.code, i.customer_id,
           to_char(i.issued_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           i.request_id
    FROM ango.issues i
    WHERE i.batch_key = key
    ORDER BY i.issued_at, i.code
$$;

-- Unissued codes in import order (leased ones included: they are not issued).
CREATE OR REPLACE FUNCTION ango.available_codes(key integer)
RETURNS TABLE (code text)
LANGUAGE sql STABLE AS $$
    SELECT c.code
    FROM ango.codes c
    WHERE c.batch_key = key
      AND NOT EXISTS (SELECT 1 FROM ango.issues i WHERE i.code = c.code)
    ORDER BY c.seq
$$;
