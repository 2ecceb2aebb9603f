-- What a DEK re-encryption job needs beyond the generic job row (see keymgmt/rotation.py):
-- the table, primary key, column and declared type it works on (as data: keymgmt never reads the
-- proxy's configuration), its counts, and its pacing.
ALTER TABLE pgveil.rotation_jobs
    ADD COLUMN target                   jsonb,
    ADD COLUMN rows_skipped             bigint NOT NULL DEFAULT 0 CHECK (rows_skipped >= 0),
    ADD COLUMN rows_unreadable          bigint NOT NULL DEFAULT 0 CHECK (rows_unreadable >= 0),
    ADD COLUMN rows_remaining           bigint CHECK (rows_remaining >= 0),
    ADD COLUMN passes                   integer NOT NULL DEFAULT 0 CHECK (passes >= 0),
    ADD COLUMN throttle_rows_per_second integer CHECK (throttle_rows_per_second > 0),
    ADD COLUMN batch_size               integer CHECK (batch_size > 0),
    ADD COLUMN started_at               timestamptz,
    ADD CONSTRAINT rotation_jobs_dek_target CHECK (kind <> 'dek' OR target IS NOT NULL);

-- at most one unfinished re-encryption per column: a new rotation supersedes (cancels) the old job
CREATE UNIQUE INDEX rotation_jobs_one_open_dek_job ON pgveil.rotation_jobs (column_id)
    WHERE kind = 'dek' AND state IN ('pending', 'running', 'paused');
