-- Failed authentications per source address, where every server process sees them:
-- N servers behind nginx share one limit instead of allowing N times it.
-- Rows older than the window are pruned as new failures arrive.
CREATE TABLE auth_failures (
    address   text        NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX auth_failures_address_idx ON auth_failures (address, failed_at);
CREATE INDEX auth_failures_failed_at_idx ON auth_failures (failed_at);
