CREATE TABLE pgveil.rotation_jobs (
    job_id       uuid PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('dek', 'kek')),
    column_id    text,
    from_key_id  uuid,
    to_key_id    uuid,
    from_kek_id  text,
    to_kek_id    text,
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'running', 'paused', 'done', 'failed', 'cancelled')),
    position     jsonb,
    rows_done    bigint NOT NULL DEFAULT 0,
    rows_total   bigint,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    CHECK ((kind = 'dek') = (column_id IS NOT NULL))
);
