-- A model loaded from a local weights file (raiox adapt --apply, reindex --weights)
-- records where that file is and its sha256, so search, the server and cron follow
-- the catalogue's model when nothing else is configured, and refuse with the reason
-- when the file went missing or changed.
ALTER TABLE models
    ADD COLUMN weights_path text,
    ADD COLUMN weights_sha256 text CHECK (weights_sha256 ~ '^[0-9a-f]{64}$');
