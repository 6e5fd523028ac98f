-- What detectors found about a session (binding mismatches), comma-separated.
ALTER TABLE sessions ADD COLUMN flags TEXT;
