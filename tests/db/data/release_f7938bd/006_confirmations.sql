-- Confirmations: what the dentist says the implant of an analysis really is.
-- Append-only: changing one's answer adds a row, the latest (highest id) wins, and
-- the history stays for audit. implant_key is kept as text beside implant_id so a
-- confirmation outlives its implant leaving the catalogue (implant_id goes NULL).
CREATE TABLE confirmations (
    id                bigserial PRIMARY KEY,
    analysis_id       bigint NOT NULL REFERENCES analyses (id) ON DELETE CASCADE,
    not_in_catalogue  boolean NOT NULL DEFAULT false,
    implant_id        bigint REFERENCES implants (id) ON DELETE SET NULL,
    implant_key       text,
    note              text CHECK (note IS NULL OR length(note) <= 2000),
    client_id         text CHECK (client_id IS NULL OR length(client_id) <= 200),
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (not_in_catalogue = (implant_key IS NULL))
);
-- Latest per analysis: DISTINCT ON (analysis_id) ... ORDER BY analysis_id, id DESC.
CREATE INDEX confirmations_analysis_idx ON confirmations (analysis_id, id DESC);
