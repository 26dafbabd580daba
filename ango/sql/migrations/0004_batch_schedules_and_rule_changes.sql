-- Schedules and rule changes (issue 14).
-- starts_at / expires_at: a batch hands out codes only in [starts_at, expires_at),
-- judged by the issuing transaction's timestamp (issued_at), in the group
-- commit itself. rules_changed_at: when the rules last changed; issues before
-- it were judged by the rules then in force (the audit checks the ones after).
ALTER TABLE ango.batches ADD COLUMN IF NOT EXISTS starts_at timestamptz;
ALTER TABLE ango.batches ADD COLUMN IF NOT EXISTS expires_at timestamptz;
ALTER TABLE ango.batches ADD COLUMN IF NOT EXISTS rules_changed_at timestamptz;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'batches_schedule_order') THEN
        ALTER TABLE ango.batches ADD CONSTRAINT batches_schedule_order
            CHECK (starts_at IS NULL OR expires_at IS NULL OR starts_at < expires_at);
    END IF;
END
$$;
