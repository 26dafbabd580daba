-- Built after the rows are loaded.
CREATE UNIQUE INDEX codes_code ON seed.codes (code);
CREATE INDEX codes_available ON seed.codes (batch_id, client_id) WHERE customer_id IS NULL;
