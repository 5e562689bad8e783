-- Numbered after 260 (clients -> clinics), whose table it changes.
-- A clinic's time zone (IANA name, e.g. America/Sao_Paulo): pages and e-mails show
-- its times in it. NULL: the server's RAIOX_TIMEZONE. The API stays UTC.
ALTER TABLE clinics ADD COLUMN timezone text
    CHECK (timezone IS NULL OR length(timezone) BETWEEN 1 AND 64);
