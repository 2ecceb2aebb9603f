CREATE TABLE pgveil.keks (
    kek_id       text PRIMARY KEY,
    provider_id  text NOT NULL,
    state        text NOT NULL DEFAULT 'ENABLED' CHECK (state IN ('ENABLED', 'DISABLED', 'DESTROYED')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    destroyed_at timestamptz
);

CREATE TABLE pgveil.deks (
    key_id       uuid PRIMARY KEY,
    scope_kind   text NOT NULL CHECK (scope_kind IN ('column', 'subject')),
    column_id    text NOT NULL,
    subject_id   bytea,
    version      integer NOT NULL CHECK (version >= 1),
    state        text NOT NULL CHECK (state IN ('ENABLED', 'DISABLED', 'DESTROYED')),
    wrapped      bytea,
    kek_id       text REFERENCES pgveil.keks (kek_id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    destroyed_at timestamptz,
    CHECK ((scope_kind = 'subject') = (subject_id IS NOT NULL)),
    -- a destroyed key is a tombstone: no wrapped material may survive it
    CHECK ((state = 'DESTROYED') = (wrapped IS NULL)),
    CHECK (wrapped IS NULL OR kek_id IS NOT NULL),
    CHECK (state <> 'DESTROYED' OR destroyed_at IS NOT NULL)
);
-- unique (column_id, subject_id, version) with NULL subject counted as one value; two partial
-- indexes rather than NULLS NOT DISTINCT, which needs PostgreSQL 15
CREATE UNIQUE INDEX deks_column_version ON pgveil.deks (column_id, version)
    WHERE subject_id IS NULL;
CREATE UNIQUE INDEX deks_subject_version ON pgveil.deks (column_id, subject_id, version)
    WHERE subject_id IS NOT NULL;
CREATE INDEX deks_subject ON pgveil.deks (subject_id) WHERE subject_id IS NOT NULL;

CREATE TABLE pgveil.blind_index_keys (
    key_id       uuid PRIMARY KEY,
    column_id    text NOT NULL,
    version      integer NOT NULL CHECK (version >= 1),
    state        text NOT NULL CHECK (state IN ('ENABLED', 'DISABLED', 'DESTROYED')),
    wrapped      bytea,
    kek_id       text REFERENCES pgveil.keks (kek_id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    destroyed_at timestamptz,
    UNIQUE (column_id, version),
    CHECK ((state = 'DESTROYED') = (wrapped IS NULL)),
    CHECK (wrapped IS NULL OR kek_id IS NOT NULL)
);
