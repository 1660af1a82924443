-- ListUserSessions and InvalidateUser's except_session_id (issue 22).

-- "Last seen when known": written by TouchSession (migration 0005 adds the same column the same
-- way, so either may run first); read by ListUserSessions. NULL: never seen since creation.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS last_seen_at timestamptz;

-- ListUserSessions pages through one user's sessions in (created_at, session_id) order, from the
-- last position returned (keyset pagination, no OFFSET): the live ones by the partial index (a
-- user's long revoked history is not walked), every one with include_revoked by the full one.
-- Built inside the migration's transaction, which blocks writes to `sessions` while it runs; on a
-- large table create both first with CREATE INDEX CONCURRENTLY (the same names): these are then
-- no-ops.
CREATE INDEX IF NOT EXISTS sessions_user_order_idx
    ON sessions (user_id, created_at, session_id);
CREATE INDEX IF NOT EXISTS sessions_user_live_order_idx
    ON sessions (user_id, created_at, session_id) WHERE revoked_at IS NULL;

-- Secrets every replica shares, made once here by Postgres's strong random generator
-- (gen_random_uuid: 122 random bits each, two per secret). `page_token` signs ListUserSessions'
-- page tokens unless PAGE_TOKEN_KEY is set: every replica, and every restart, signs and checks
-- with the same key without any configuration. It guards against altered and made-up tokens, not
-- against readers of this database (who can read the sessions themselves).
CREATE TABLE IF NOT EXISTS service_secrets (
    name   text  PRIMARY KEY,
    secret bytea NOT NULL CHECK (octet_length(secret) >= 16)
);
INSERT INTO service_secrets (name, secret)
VALUES ('page_token',
        decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'))
ON CONFLICT (name) DO NOTHING;
