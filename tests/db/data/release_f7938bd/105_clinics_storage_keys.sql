-- Deleting an analysis (purge, DELETE /analyses/{id}) removes its image only when no
-- other row refers to the same content-addressed object: these make that check an
-- index lookup instead of a scan of every analysis and catalogue image.
CREATE INDEX analyses_storage_key_idx ON analyses (storage_key) WHERE storage_key IS NOT NULL;
CREATE INDEX implant_images_storage_key_idx ON implant_images (storage_key)
    WHERE storage_key IS NOT NULL;
