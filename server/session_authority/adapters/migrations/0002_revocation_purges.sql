-- Durable revocation: a revocation is recorded in the same statement that makes it, with
-- `purge_pending` set until some replica confirms the tombstone is in Redis. Any replica
-- drains what is pending (the revoker may die, or Redis may be unreachable, before it does);
-- the drain's cost is what is pending, not every revocation ever made.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS purge_pending boolean NOT NULL DEFAULT false;

CREATE INDEX IF NOT EXISTS sessions_purge_pending_idx ON sessions (revoked_at) WHERE purge_pending;
