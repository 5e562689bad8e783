-- The webhook server's notification queue: finished analyses whose result still
-- has to be POSTed to RAIOX_NOTIFY_URL. Partial, so it stays as small as the backlog.
CREATE INDEX analyses_notify_idx ON analyses (next_attempt_at) WHERE notify_status = 'pending';
