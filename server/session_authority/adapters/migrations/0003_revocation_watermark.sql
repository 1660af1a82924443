-- Revocation watermark (see core/revocation.py, "Watermark"): Postgres orders revocations by the
-- transaction that made them, and remembers how far Redis has been confirmed to hold them, so a
-- Redis that goes back in time (a backup restored into it, DEBUG RELOAD, SWAPDB, a lagging
-- replica promoted) is caught by comparing what it holds with what Postgres confirmed.
--
-- `revocation_xid`: the id of the transaction that revoked the row, set by the trigger below for
-- every writer (this release, the previous one during a rolling upgrade, an operator's UPDATE).
-- Rows revoked before this migration keep NULL (read as 0: older than any watermark).
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS revocation_xid bigint;

CREATE OR REPLACE FUNCTION session_authority_revocation_xid() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.revoked_at IS NOT NULL
       AND (TG_OP = 'INSERT' OR OLD.revoked_at IS DISTINCT FROM NEW.revoked_at) THEN
        NEW.revocation_xid := pg_current_xact_id()::text::bigint;
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS sessions_revocation_xid ON sessions;
CREATE TRIGGER sessions_revocation_xid
    BEFORE INSERT OR UPDATE OF revoked_at ON sessions
    FOR EACH ROW EXECUTE FUNCTION session_authority_revocation_xid();

-- Replays and sweeps walk revocations in watermark order (transaction, then token hash).
CREATE INDEX IF NOT EXISTS sessions_revocation_order_idx
    ON sessions ((COALESCE(revocation_xid, 0)), token_hash) WHERE revoked_at IS NOT NULL;

-- One row: the highest watermark some replica wrote into Redis and then confirmed here. Text in
-- the "C" collation, compared byte by byte, as Redis's script and Python compare it.
CREATE TABLE IF NOT EXISTS revocation_watermark (
    id        boolean PRIMARY KEY DEFAULT true CHECK (id),
    confirmed text COLLATE "C" NOT NULL DEFAULT ''
);
INSERT INTO revocation_watermark DEFAULT VALUES ON CONFLICT DO NOTHING;
