-- Calibrations (`raiox calibrate`): what turns a search's scores into a calibrated
-- probability, a conformal prediction set and an out-of-catalogue flag, for one model.
-- One row per fit, the latest per model wins and the history stays. A model switch
-- marks rows stale (stale_at, stale_reason); search then stops using them until a refit.
CREATE TABLE calibrations (
    id            bigserial PRIMARY KEY,
    model_id      text NOT NULL,
    target        double precision NOT NULL CHECK (target > 0 AND target < 1),
    false_alarm   double precision NOT NULL CHECK (false_alarm > 0 AND false_alarm < 1),
    tta           boolean NOT NULL,
    source        text NOT NULL CHECK (source IN ('labels', 'confirmed', 'catalogue')),
    counts        jsonb NOT NULL,     -- queries per kind, implants, what was kept apart
    data_sha256   text NOT NULL,      -- hash of the sorted list of what was measured
    params        jsonb NOT NULL,     -- the fit: coefficients, temperature, thresholds
    metrics       jsonb NOT NULL,     -- the fit's own held-out measurements
    stale_at      timestamptz,
    stale_reason  text,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX calibrations_model_idx ON calibrations (model_id, id DESC);

-- What an answer said about its own trust (probability, prediction set, out-of-catalogue
-- flag, the ranked scores they came from), stored with it so every surface shows the
-- same numbers and a confirmation can later recalibrate from it.
ALTER TABLE analyses ADD COLUMN trust jsonb;
