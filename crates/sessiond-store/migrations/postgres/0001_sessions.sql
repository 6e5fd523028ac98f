-- Sessions and tenant policies. Times are Unix milliseconds (BIGINT), as in every sessiond store.
CREATE TABLE sessions (
    handle           TEXT PRIMARY KEY,
    token_hash       BYTEA NOT NULL UNIQUE,   -- SHA-256 of the token; verify is one lookup here
    user_id          TEXT NOT NULL,
    tenant           TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    last_seen_at     BIGINT NOT NULL,
    remember_me      BOOLEAN NOT NULL,
    auth_method      TEXT NOT NULL,
    auth_aal         SMALLINT NOT NULL,
    authenticated_at BIGINT NOT NULL,
    ip               TEXT,
    user_agent       TEXT,
    browser          TEXT,
    os               TEXT,
    data             TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('active', 'revoked', 'expired')),
    revoked_reason   TEXT,
    ended_at         BIGINT
);
-- A user's sessions: listing, limits and force logout.
CREATE INDEX sessions_user ON sessions (user_id, tenant);
-- The sweeper: active sessions by age, ended sessions by end time.
CREATE INDEX sessions_active_seen ON sessions (last_seen_at) WHERE state = 'active';
CREATE INDEX sessions_ended ON sessions (ended_at) WHERE ended_at IS NOT NULL;

CREATE TABLE policies (
    tenant   TEXT PRIMARY KEY,
    document TEXT NOT NULL
);
