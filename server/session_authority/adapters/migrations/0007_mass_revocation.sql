-- A mass revocation (InvalidateUser of 50,000 sessions: one UPDATE, and 50,000 events by the
-- trigger of migration 0006) made cheaper, without changing what it records.
--
-- `sessions_user_live_idx` (user_id) WHERE revoked_at IS NULL duplicates the leading column and
-- the predicate of `sessions_user_live_order_idx` (migration 0004): every query that used it
-- (revoke_user, revoke_user_except, live listings, of this release and the previous one) is served
-- by the other one, and each CreateSession and TouchSession wrote an entry into both.
DROP INDEX IF EXISTS sessions_user_live_idx;

-- The events trigger, as in migration 0006, with two changes.
--
-- Planned at each call (EXECUTE). PL/pgSQL caches a statement's plan per connection, and after
-- five calls may keep a generic one, planned for the transition tables of that call: after a few
-- one-row UPDATEs (a touch, a revocation, a confirmed purge) on a pooled connection, the join of
-- old_rows and new_rows became a nested loop, 50,000 x 50,000 rows for a mass revocation
-- (measured on Postgres 16: 5,000 rows 1.4 s, 10,000 rows 5.7 s, growing as the square). Planning
-- at each call sees the tables' real sizes (a hash join); it costs well under a millisecond.
--
-- No `ORDER BY session_id`: the order of events is (xid, seq), and nothing reads an order by
-- session_id among the events of one statement; sorting 50,000 rows (spilled past work_mem) bought
-- nothing.
CREATE OR REPLACE FUNCTION session_authority_revocation_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    why text := COALESCE(
        NULLIF(current_setting('session_authority.revocation_reason', true), ''), 'admin');
    written bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        EXECUTE $q$
            INSERT INTO revocation_events (session_id, user_id, reason, revoked_at)
            SELECT n.session_id, n.user_id, $1, n.revoked_at
            FROM new_rows n WHERE n.revoked_at IS NOT NULL
        $q$ USING why;
    ELSIF TG_OP = 'UPDATE' THEN
        EXECUTE $q$
            INSERT INTO revocation_events (session_id, user_id, reason, revoked_at)
            SELECT n.session_id, n.user_id, $1, n.revoked_at
            FROM new_rows n JOIN old_rows o USING (session_id)
            WHERE o.revoked_at IS NULL AND n.revoked_at IS NOT NULL
        $q$ USING why;
    ELSE
        -- A live session deleted (an operator's DELETE) stops validating: a revocation too.
        EXECUTE $q$
            INSERT INTO revocation_events (session_id, user_id, reason, revoked_at)
            SELECT o.session_id, o.user_id, 'admin', now()
            FROM old_rows o WHERE o.revoked_at IS NULL AND o.expires_at > now()
        $q$;
    END IF;
    GET DIAGNOSTICS written = ROW_COUNT;
    IF written > 0 THEN
        PERFORM pg_notify('session_authority_revocations', '');
    END IF;
    RETURN NULL;
END
$$;
