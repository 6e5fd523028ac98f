-- Each session's own deadlines, so that a timeout, once reached, is final whatever the policy
-- becomes: the absolute expiry fixed at creation, and the idle timeout in force at the session's
-- last pinned use (both in force together with the current policy, whichever is sooner). Rows
-- written before have neither: they are derived from the policy until the session is next used.
-- And the count of token rotations, which access tokens carry: one issued before the session's
-- last rotation is refused.
ALTER TABLE sessions ADD COLUMN expires_at BIGINT;
ALTER TABLE sessions ADD COLUMN idle_timeout_s BIGINT;
ALTER TABLE sessions ADD COLUMN rotations INTEGER NOT NULL DEFAULT 0;
