-- Sliding expiry (TouchSession): when the session was last touched, by Postgres's clock. A touch
-- writes the row only when this is TOUCH_INTERVAL old (or NULL: never touched), so thousands of
-- touches of one session cost one write per interval. Nullable, no default: adding it rewrites
-- nothing. `IF NOT EXISTS`: migration 0004 (ListUserSessions, which reads it) adds the same
-- column, and either may run first.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS last_seen_at timestamptz;
