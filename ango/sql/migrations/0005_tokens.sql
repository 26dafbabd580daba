-- Client-scoped tokens (`ango token create --client ID`). Only the SHA-256 of
-- each token is stored: the tokens are 256-bit random strings, so a fast hash
-- cannot be reversed or guessed, and lookups stay an index hit (see ango/tokens.py).
-- No foreign key to ango.clients: a token may be made before the client's first batch.
CREATE TABLE IF NOT EXISTS ango.tokens (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL,
    client_id   uuid NOT NULL,
    hash        bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- A name names one live token; revoked ones stay listed, and their names free.
CREATE UNIQUE INDEX IF NOT EXISTS tokens_live_name ON ango.tokens (name) WHERE revoked_at IS NULL;
