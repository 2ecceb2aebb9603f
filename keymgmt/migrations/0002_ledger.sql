-- payload holds the exact bytes the hash covers, so verification never depends on how
-- PostgreSQL re-renders a json value
CREATE TABLE pgveil.ledger (
    seq         bigint PRIMARY KEY CHECK (seq >= 1),
    recorded_at timestamptz NOT NULL DEFAULT now(),
    action      text NOT NULL,
    actor       text NOT NULL,
    payload     bytea NOT NULL,
    prev_hash   bytea NOT NULL,
    hash        bytea NOT NULL UNIQUE,
    signature   bytea
);

CREATE FUNCTION pgveil.ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgveil.ledger is append-only' USING ERRCODE = '55000';
END
$$;
CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE OR DELETE ON pgveil.ledger
    FOR EACH ROW EXECUTE FUNCTION pgveil.ledger_append_only();
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON pgveil.ledger
    FOR EACH STATEMENT EXECUTE FUNCTION pgveil.ledger_append_only();
