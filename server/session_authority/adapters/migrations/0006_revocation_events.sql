-- Revocation events (WatchRevocations, core/watch.py): a durable record of every revocation,
-- written by triggers on `sessions`, so that every writer is covered: this release, the previous
-- one during a rolling upgrade, an operator's UPDATE or DELETE in SQL.
--
-- Order and exactness. `seq` is assigned when the event is written, but transactions commit out
-- of order, so "events with seq > N" read naively could skip an event that commits later with a
-- lower seq. Events are therefore ordered by (xid, seq): `xid` is the writing transaction's id,
-- and a reader delivers only events whose xid is below its snapshot's xmin (every transaction
-- older than xmin has ended, so no event can appear below it later): the revocation watermark's
-- rule (migration 0003). A cursor is a position in that order.
--
-- `reason`: the RPC that revoked sets the transaction-local setting
-- `session_authority.revocation_reason` ('explicit', 'user_wide'); anything else is 'admin'.
CREATE TABLE IF NOT EXISTS revocation_events (
    seq         bigserial   PRIMARY KEY,
    xid         bigint      NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
    session_id  uuid        NOT NULL,
    user_id     text        NOT NULL,
    reason      text        NOT NULL,
    revoked_at  timestamptz NOT NULL,
    -- Postgres's clock when the event was written: what retention is measured by.
    recorded_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS revocation_events_order_idx ON revocation_events (xid, seq);
CREATE INDEX IF NOT EXISTS revocation_events_recorded_idx ON revocation_events (recorded_at);

-- One row: the highest (xid, seq) ever pruned. A cursor below it may have missed a pruned event.
CREATE TABLE IF NOT EXISTS revocation_event_floor (
    id  boolean PRIMARY KEY DEFAULT true CHECK (id),
    xid bigint  NOT NULL DEFAULT 0,
    seq bigint  NOT NULL DEFAULT 0
);
INSERT INTO revocation_event_floor DEFAULT VALUES ON CONFLICT DO NOTHING;

-- Statement-level (transition tables): an InvalidateUser of 50,000 sessions writes its events in
-- one INSERT ... SELECT, and wakes the listeners once (NOTIFY is delivered at commit).
CREATE OR REPLACE FUNCTION session_authority_revocation_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    why text := COALESCE(
        NULLIF(current_setting('session_authority.revocation_reason', true), ''), 'admin');
    written bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO revocation_events (session_id, user_id, reason, revoked_at)
        SELECT n.session_id, n.user_id, why, n.revoked_at
        FROM new_rows n WHERE n.revoked_at IS NOT NULL
        ORDER BY n.session_id;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO revocation_events (session_id, user_id, reason, revoked_at)
        SELECT n.session_id, n.user_id, why, n.revoked_at
        FROM new_rows n JOIN old_rows o USING (session_id)
        WHERE o.revoked_at IS NULL AND n.revoked_at IS NOT NULL
        ORDER BY n.session_id;
    ELSE
        -- A live session deleted (an operator's DELETE) stops validating: a revocation too.
        INSERT INTO revocation_events (session_id, user_id, reason, revoked_at)
        SELECT o.session_id, o.user_id, 'admin', now()
        FROM old_rows o WHERE o.revoked_at IS NULL AND o.expires_at > now()
        ORDER BY o.session_id;
    END IF;
    GET DIAGNOSTICS written = ROW_COUNT;
    IF written > 0 THEN
        PERFORM pg_notify('session_authority_revocations', '');
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS sessions_revocation_events_insert ON sessions;
CREATE TRIGGER sessions_revocation_events_insert
    AFTER INSERT ON sessions REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION session_authority_revocation_events();

DROP TRIGGER IF EXISTS sessions_revocation_events_update ON sessions;
CREATE TRIGGER sessions_revocation_events_update
    AFTER UPDATE ON sessions REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION session_authority_revocation_events();

DROP TRIGGER IF EXISTS sessions_revocation_events_delete ON sessions;
CREATE TRIGGER sessions_revocation_events_delete
    AFTER DELETE ON sessions REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION session_authority_revocation_events();
