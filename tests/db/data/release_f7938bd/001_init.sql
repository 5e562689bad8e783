-- raiox schema, version 1.
-- Embeddings live in their own table keyed by (image, model) so a model switch
-- (even to another dimension) fills new rows beside the old ones and becomes
-- active with one settings update; see queries.activate_model.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE settings (
    key        text PRIMARY KEY,
    value      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Every model that has (or had) embeddings here. The HNSW index of a model is a
-- partial expression index over image_embeddings, created by the code because
-- its dimension is only known once the model is loaded.
CREATE TABLE models (
    model_id        text PRIMARY KEY,
    dim             integer NOT NULL CHECK (dim > 0),
    preprocess_ver  integer NOT NULL,
    index_name      text NOT NULL UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE catalogue_roots (
    id               bigserial PRIMARY KEY,
    path             text NOT NULL UNIQUE,
    last_ingested_at timestamptz
);

CREATE TABLE implants (
    id            bigserial PRIMARY KEY,
    key           text NOT NULL UNIQUE,
    name          text NOT NULL,
    manufacturer  text NOT NULL,
    system        text,
    diameter_mm   real CHECK (diameter_mm IS NULL OR diameter_mm > 0),
    length_mm     real CHECK (length_mm IS NULL OR length_mm > 0),
    connection    text,
    notes         text,
    extra         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX implants_manufacturer_idx ON implants (lower(manufacturer));

CREATE TABLE implant_images (
    id           bigserial PRIMARY KEY,
    implant_id   bigint NOT NULL REFERENCES implants (id) ON DELETE CASCADE,
    sha256       text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    root_id      bigint REFERENCES catalogue_roots (id) ON DELETE SET NULL,
    source_path  text,          -- relative to the catalogue root
    file_size    bigint,
    file_mtime_ns bigint,
    storage_key  text,
    format       text,
    width        integer,
    height       integer,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (implant_id, sha256)
);
CREATE INDEX implant_images_root_idx ON implant_images (root_id, source_path);
CREATE INDEX implant_images_sha_idx ON implant_images (sha256);

CREATE TABLE image_embeddings (
    image_id    bigint NOT NULL REFERENCES implant_images (id) ON DELETE CASCADE,
    model_id    text NOT NULL REFERENCES models (model_id) ON DELETE CASCADE,
    embedding   vector NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (image_id, model_id)
);
CREATE INDEX image_embeddings_model_idx ON image_embeddings (model_id);

-- One row per submitted X-ray; also the server's durable job queue.
CREATE TABLE analyses (
    id               bigserial PRIMARY KEY,
    source           text NOT NULL CHECK (source IN ('cli', 'upload', 'webhook')),
    client_id        text,
    idempotency_key  text UNIQUE,
    image_url        text,
    image_sha256     text,
    storage_key      text,
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
    model_id         text,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    error            text,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    locked_until     timestamptz,
    notify_status    text CHECK (notify_status IN ('pending', 'sent', 'failed')),
    notify_attempts  integer NOT NULL DEFAULT 0,
    notify_error     text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
CREATE INDEX analyses_queue_idx ON analyses (next_attempt_at) WHERE status IN ('pending', 'running');

CREATE TABLE analysis_matches (
    analysis_id  bigint NOT NULL REFERENCES analyses (id) ON DELETE CASCADE,
    rank         integer NOT NULL CHECK (rank >= 1),
    implant_id   bigint REFERENCES implants (id) ON DELETE SET NULL,
    image_id     bigint REFERENCES implant_images (id) ON DELETE SET NULL,
    implant_key  text NOT NULL,
    score        real NOT NULL,
    PRIMARY KEY (analysis_id, rank)
);
