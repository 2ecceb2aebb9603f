-- Rotation by subject kind (keymgmt/rotation.py, docs/rotation.md). A kind's keys are rotated by raising
-- its generation: a subject key version whose kind_generation is below its kind's generation is no
-- longer current for writes, so the next write of that subject (or the re-encryption job meeting one of
-- its rows) creates the subject's next version, stamped with the generation then. Nothing is done per
-- subject at rotation time, however many subjects the kind has.
CREATE TABLE pgveil.subject_kinds (
    kind        text PRIMARY KEY,
    generation  integer NOT NULL CHECK (generation >= 1),
    rotated_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE pgveil.deks
    ADD COLUMN kind_generation integer NOT NULL DEFAULT 0 CHECK (kind_generation >= 0),
    ADD CONSTRAINT deks_kind_generation CHECK (kind_generation = 0 OR scope_kind = 'subject');

-- a kind's job: kind 'subject', column_id the kind's scope (pgveil.subject.<kind>), the tables in target
ALTER TABLE pgveil.rotation_jobs DROP CONSTRAINT rotation_jobs_kind_check;
ALTER TABLE pgveil.rotation_jobs
    ADD CONSTRAINT rotation_jobs_kind_check CHECK (kind IN ('dek', 'kek', 'encrypt', 'decrypt', 'subject')),
    ADD CONSTRAINT rotation_jobs_subject_target CHECK (kind <> 'subject' OR target IS NOT NULL);
-- at most one unfinished re-encryption per kind: a new rotation supersedes (cancels) the old job
CREATE UNIQUE INDEX rotation_jobs_one_open_subject_job ON pgveil.rotation_jobs (column_id)
    WHERE kind = 'subject' AND state IN ('pending', 'running', 'paused');
