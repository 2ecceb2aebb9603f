-- KEK versions (see keymgmt/kek_rotation.py): each KEK gets a version number for operators
-- (`pgveil keys destroy-kek VERSION`), and exactly one is primary: the one new data keys are wrapped
-- under. A version number comes from a sequence, so a pgveil that predates this migration, which
-- registers its KEK without one, still can.
CREATE SEQUENCE pgveil.kek_versions AS integer;
ALTER TABLE pgveil.keks
    ADD COLUMN version    integer,
    ADD COLUMN is_primary boolean NOT NULL DEFAULT false;
UPDATE pgveil.keks k SET version = o.n
FROM (SELECT kek_id, row_number() OVER (ORDER BY created_at, kek_id) AS n FROM pgveil.keks) o
WHERE k.kek_id = o.kek_id;
SELECT setval('pgveil.kek_versions', coalesce(max(version), 0) + 1, false) FROM pgveil.keks;
ALTER SEQUENCE pgveil.kek_versions OWNED BY pgveil.keks.version;
ALTER TABLE pgveil.keks
    ALTER COLUMN version SET DEFAULT nextval('pgveil.kek_versions'),
    ALTER COLUMN version SET NOT NULL,
    ADD CONSTRAINT keks_version_unique UNIQUE (version),
    ADD CONSTRAINT keks_primary_enabled CHECK (NOT is_primary OR state = 'ENABLED'),
    ADD CONSTRAINT keks_destroyed_at CHECK (state <> 'DESTROYED' OR destroyed_at IS NOT NULL);
-- the KEK that wraps the newest data keys, among those still enabled, is primary
UPDATE pgveil.keks SET is_primary = true
WHERE kek_id = (
    SELECT k.kek_id FROM pgveil.keks k
    LEFT JOIN LATERAL (SELECT max(d.created_at) AS newest FROM pgveil.deks d WHERE d.kek_id = k.kek_id) d ON true
    WHERE k.state = 'ENABLED'
    ORDER BY d.newest DESC NULLS LAST, k.version DESC LIMIT 1
);
CREATE UNIQUE INDEX keks_one_primary ON pgveil.keks (is_primary) WHERE is_primary;

-- what still depends on a KEK (destroy-kek counts it; rotation finds what is left)
CREATE INDEX deks_kek ON pgveil.deks (kek_id) WHERE wrapped IS NOT NULL;
CREATE INDEX blind_index_keys_kek ON pgveil.blind_index_keys (kek_id) WHERE wrapped IS NOT NULL;

-- at most one unfinished KEK rotation
CREATE UNIQUE INDEX rotation_jobs_one_open_kek_job ON pgveil.rotation_jobs (kind)
    WHERE kind = 'kek' AND state IN ('pending', 'running', 'paused');
