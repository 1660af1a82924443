-- Sessions: the source of truth. The token itself is never stored, only its SHA-256.
CREATE TABLE IF NOT EXISTS sessions (
    session_id  uuid        PRIMARY KEY,
    token_hash  bytea       NOT NULL,
    user_id     text        NOT NULL,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz,
    metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT sessions_token_hash_len CHECK (octet_length(token_hash) = 32),
    CONSTRAINT sessions_expiry_after_creation CHECK (expires_at > created_at)
);

-- Validation looks sessions up by token hash.
CREATE UNIQUE INDEX IF NOT EXISTS sessions_token_hash_key ON sessions (token_hash);

-- InvalidateUser revokes a user's live sessions.
CREATE INDEX IF NOT EXISTS sessions_user_live_idx ON sessions (user_id) WHERE revoked_at IS NULL;

-- Revocation replay (re-applying recent revocations to the cache) scans by time.
CREATE INDEX IF NOT EXISTS sessions_revoked_at_idx ON sessions (revoked_at) WHERE revoked_at IS NOT NULL;

-- Housekeeping of expired rows.
CREATE INDEX IF NOT EXISTS sessions_expires_at_idx ON sessions (expires_at);
