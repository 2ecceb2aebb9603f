-- Access audit (proxy.audit): per pgveil instance, session, login role, policy role, governed column and
-- outcome, how many values were read in one flush period. Names and counts only: never a value.
CREATE TABLE pgveil.access_audit (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance      text NOT NULL,
    session_id    bigint NOT NULL,
    login_role    text NOT NULL,
    policy_role   text NOT NULL,
    column_id     text NOT NULL,
    outcome       text NOT NULL CHECK (outcome IN ('plaintext', 'masked', 'hidden', 'ciphertext')),
    values_read   bigint NOT NULL CHECK (values_read > 0),
    period_start  timestamptz NOT NULL,
    period_end    timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (period_start <= period_end)
);
CREATE INDEX access_audit_period_end ON pgveil.access_audit (period_end);
