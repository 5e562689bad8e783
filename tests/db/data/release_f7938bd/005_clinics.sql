-- Clinics as tenants (issue 10): their own API keys, analyses scoped to them,
-- unguessable public ids, and anonymous counts of what retention deleted.

-- A clinic. Only SHA-256 hashes of its keys are stored (a key is 256 random bits,
-- so a plain hash cannot be brute-forced). During a rotation the previous key
-- keeps working until previous_expires_at.
CREATE TABLE clients (
    id                  bigserial PRIMARY KEY,
    name                text NOT NULL UNIQUE
                        CHECK (name = btrim(name) AND length(name) BETWEEN 1 AND 100),
    key_hash            bytea NOT NULL UNIQUE,
    previous_key_hash   bytea UNIQUE,
    previous_expires_at timestamptz,
    notify_url          text,
    email               text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    rotated_at          timestamptz,
    last_used_at        timestamptz,
    revoked_at          timestamptz
);

-- The clinic an analysis belongs to (NULL: submitted with the operator token).
-- client_id (text) stays what the sender labelled it with.
ALTER TABLE analyses ADD COLUMN clinic_id bigint REFERENCES clients (id);
CREATE INDEX analyses_clinic_idx ON analyses (clinic_id, created_at DESC);
CREATE INDEX analyses_created_idx ON analyses (created_at);

-- The id every URL and answer uses; the bigserial stays internal. Existing rows
-- get one here (gen_random_uuid: UUIDv4, 122 random bits).
ALTER TABLE analyses ADD COLUMN public_id uuid NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE analyses ADD CONSTRAINT analyses_public_id_key UNIQUE (public_id);

-- What purge and DELETE removed, as counts only: no ids, no images, no results.
CREATE TABLE analysis_counts (
    day        date NOT NULL,
    clinic_id  bigint NOT NULL DEFAULT 0,  -- 0: the operator's own (no clinic)
    source     text NOT NULL,
    status     text NOT NULL,
    analyses   bigint NOT NULL,
    PRIMARY KEY (day, clinic_id, source, status)
);
