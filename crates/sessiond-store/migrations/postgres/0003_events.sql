-- Audit events (written in the transaction of the change they record), the devices each user
-- has signed in from (new-device detection), and webhook deliveries (the outbox is the set of
-- events with `pending`).
CREATE TABLE events (
    id      TEXT PRIMARY KEY,
    at      BIGINT NOT NULL,
    type    TEXT NOT NULL,
    tenant  TEXT NOT NULL,
    user_id TEXT,
    handle  TEXT,
    pending BOOLEAN NOT NULL,
    doc     TEXT NOT NULL
);
CREATE INDEX events_user ON events (user_id, id) WHERE user_id IS NOT NULL;
CREATE INDEX events_handle ON events (handle, id) WHERE handle IS NOT NULL;
CREATE INDEX events_at ON events (at);
CREATE INDEX events_pending ON events (id) WHERE pending;

CREATE TABLE devices (
    tenant       TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, user_id, device_id)
);

CREATE TABLE deliveries (
    id         TEXT PRIMARY KEY,
    webhook    TEXT NOT NULL,
    state      TEXT NOT NULL,
    next_at    BIGINT,
    updated_at BIGINT NOT NULL,
    doc        TEXT NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending';
CREATE INDEX deliveries_webhook ON deliveries (webhook, id);
