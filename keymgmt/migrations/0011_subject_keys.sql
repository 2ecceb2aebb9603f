-- Per-subject keys (docs/subject-keys.md). A data subject is (kind, canonical subject id); its DEK
-- versions are rows of pgveil.deks with scope_kind 'subject', column_id 'pgveil.subject.<kind>' (schema
-- pgveil is reserved, so no protected column has such an id) and subject_id the canonical id, so the
-- existing unique index deks_subject_version makes a first version race-free (INSERT ... ON CONFLICT DO
-- NOTHING, then read). subject_kind names the kind for people and for the shredding to come.
ALTER TABLE pgveil.deks
    ADD COLUMN subject_kind text,
    ADD CONSTRAINT deks_subject_kind CHECK (
        subject_kind IS NULL OR (scope_kind = 'subject' AND column_id = 'pgveil.subject.' || subject_kind)
    );

-- One row per data subject pgveil has made a key for: the room shredding needs. A shredded subject
-- stays (state SHREDDED, a tombstone) so that it is never given a new key; nothing shreds yet.
CREATE TABLE pgveil.subjects (
    kind        text NOT NULL,
    subject_id  bytea NOT NULL,
    state       text NOT NULL DEFAULT 'ACTIVE' CHECK (state IN ('ACTIVE', 'SHREDDED')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    shredded_at timestamptz,
    PRIMARY KEY (kind, subject_id),
    CHECK ((state = 'SHREDDED') = (shredded_at IS NOT NULL))
);
