-- Column migrations (see keymgmt/column_migration.py): `pgveil encrypt` moves a plaintext column to an
-- encrypted bytea column online, `pgveil decrypt` moves it back. They are jobs of the generic job
-- machinery (keymgmt/jobs.py: claims, pause, resume, cancel, `pgveil jobs status`), of kinds
-- 'encrypt' and 'decrypt', with the column, its table's primary key and the names of the objects the
-- job creates in `target`, and the phase (setup, backfill, swapped) in `position`.
ALTER TABLE pgveil.rotation_jobs DROP CONSTRAINT rotation_jobs_kind_check;
ALTER TABLE pgveil.rotation_jobs
    ADD CONSTRAINT rotation_jobs_kind_check CHECK (kind IN ('dek', 'kek', 'encrypt', 'decrypt'));
-- every kind but 'kek' works on one column
ALTER TABLE pgveil.rotation_jobs DROP CONSTRAINT rotation_jobs_check;
ALTER TABLE pgveil.rotation_jobs
    ADD CONSTRAINT rotation_jobs_column_check CHECK ((kind = 'kek') = (column_id IS NULL)),
    ADD CONSTRAINT rotation_jobs_migration_target CHECK (kind NOT IN ('encrypt', 'decrypt') OR target IS NOT NULL);

-- at most one unfinished migration per column; pgveil reads this set to serve such a column as it is
-- stored until the swap
CREATE UNIQUE INDEX rotation_jobs_one_open_migration ON pgveil.rotation_jobs (column_id)
    WHERE kind IN ('encrypt', 'decrypt') AND state IN ('pending', 'running', 'paused');
