-- Pages and notifications a person receives.
--
-- One notification queue for every channel (webhook, e-mail): a row per finished
-- analysis and channel, with its own delivery state, so an e-mail that keeps
-- failing never holds back the webhook and both are visible on the analysis.
CREATE TABLE notifications (
    analysis_id      bigint NOT NULL REFERENCES analyses (id) ON DELETE CASCADE,
    channel          text NOT NULL CHECK (channel IN ('webhook', 'email')),
    recipient        text,  -- e-mail address; NULL for the webhook (its URL is a setting)
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    error            text,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    locked_until     timestamptz,
    sent_at          timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (analysis_id, channel)
);
CREATE INDEX notifications_due_idx ON notifications (next_attempt_at) WHERE status = 'pending';

-- The webhook state lived on analyses until now: move it over.
INSERT INTO notifications (analysis_id, channel, status, attempts, error, next_attempt_at)
SELECT id, 'webhook', notify_status, notify_attempts, notify_error,
       CASE WHEN notify_status = 'pending' THEN next_attempt_at ELSE now() END
FROM analyses WHERE notify_status IS NOT NULL;
DROP INDEX analyses_notify_idx;
ALTER TABLE analyses DROP COLUMN notify_status, DROP COLUMN notify_attempts,
                     DROP COLUMN notify_error;

ALTER TABLE analyses
    -- pt-BR / en: the language of whoever submitted it; e-mails are written in it.
    ADD COLUMN lang text,
    -- The submitter's e-mail answer (Jotform), used when the clinic has no address.
    ADD COLUMN reply_email text,
    -- The region the upload page's crop box chose, in pixels of the stored image.
    ADD COLUMN crop integer[] CHECK (crop IS NULL OR cardinality(crop) = 4),
    -- Why a failed analysis failed, as a word a page can translate
    -- (image, download, catalogue, internal); `error` keeps the technical line.
    ADD COLUMN error_kind text;
