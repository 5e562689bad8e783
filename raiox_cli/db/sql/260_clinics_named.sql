-- One word for a tenant: the table of clinics was called `clients`. It becomes
-- `clinics`, with its sequence, primary key, unique and check constraints, so the
-- schema says what the code and the CLI say. Rows, keys and ids are untouched: a
-- clinic's key hash is the same row, so its key keeps authenticating.
--
-- Not renamed, on purpose: analyses.client_id and confirmations.client_id (text).
-- They are not the tenant (that is analyses.clinic_id, a reference to this table)
-- but the free label a sender puts in the webhook's JSON field `client_id`, and
-- the HTTP API keeps that name.
ALTER TABLE clients RENAME TO clinics;
ALTER SEQUENCE clients_id_seq RENAME TO clinics_id_seq;
ALTER TABLE clinics RENAME CONSTRAINT clients_pkey TO clinics_pkey;
ALTER TABLE clinics RENAME CONSTRAINT clients_name_key TO clinics_name_key;
ALTER TABLE clinics RENAME CONSTRAINT clients_key_hash_key TO clinics_key_hash_key;
ALTER TABLE clinics RENAME CONSTRAINT clients_previous_key_hash_key
    TO clinics_previous_key_hash_key;
ALTER TABLE clinics RENAME CONSTRAINT clients_name_check TO clinics_name_check;
