-- Token mode: each session's refresh state, and the shared signing keyring.
ALTER TABLE sessions ADD COLUMN refresh TEXT;

CREATE TABLE meta (
    name    TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    value   TEXT NOT NULL
);
