"""The pure parts of rotation by subject kind: sorting a batch by key generation, re-sealing each value
under its own subject's next version, the job's position machine, the batch SQL, the job status."""

from __future__ import annotations

import datetime
import os
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keymgmt.envelope import (
    DataKey,
    KeyState,
    Opener,
    OpenFailed,
    column_associated_data,
    seal,
    subject_scope,
)
from keymgmt.jobs import JobState, JobStatus
from keymgmt.rotation import (
    MAX_PASSES,
    KeyColumn,
    RotationTarget,
    SubjectKeyInfo,
    advance_position,
    count_under_any_sql,
    plan_subject_batch,
    reseal_subject_batch,
    select_all_batch_sql,
)

SCOPE = subject_scope("customer")
COLUMN = "public.customers.email"
AD = column_associated_data(COLUMN)


def key(subject: bytes, version: int = 1, state: KeyState = KeyState.ENABLED) -> DataKey:
    return DataKey.from_material(
        uuid.uuid4().bytes, os.urandom(32), state=state, column_id=SCOPE, subject=subject, version=version
    )


def target(table: str = "customers", column: str = "email") -> RotationTarget:
    return RotationTarget("public", table, column, "text", (KeyColumn("id", "integer"),))


def opener(*keys: DataKey) -> Opener:
    by_id = {bytes(k.key_id): k for k in keys}
    return Opener(by_id.get)


def info_of(keys: dict[DataKey, int]) -> dict[bytes, SubjectKeyInfo]:
    return {bytes(k.key_id): SubjectKeyInfo(k.subject or b"", k.version, gen, k.state) for k, gen in keys.items()}


# -- sorting a batch ------------------------------------------------------------------------------------------


def test_a_batch_is_sorted_by_the_generation_its_keys_belong_to() -> None:
    a1, a2, b1 = key(b"1"), key(b"1", 2), key(b"2")
    gone = key(b"3")
    info = info_of({a1: 0, a2: 1, b1: 0}) | {bytes(gone.key_id): SubjectKeyInfo(b"3", 1, 0, KeyState.DESTROYED)}
    rows = [
        (("1",), seal(a1, b"old a", AD)),
        (("2",), seal(a2, b"new a", AD)),  # written since the rotation: under the new generation already
        (("3",), seal(b1, b"old b", AD)),
        (("4",), b"not an envelope"),
        (("5",), seal(key(b"9"), b"unknown key", AD)),
        (("6",), seal(gone, b"destroyed key", AD)),
    ]
    plan = plan_subject_batch(rows, info.get, generation=1)
    assert [(pk, s) for pk, _, s in plan.stale] == [(("1",), b"1"), (("3",), b"2")]
    assert plan.current == 1
    assert plan.unreadable == 3
    assert plan.subjects == [b"1", b"2"]


# -- re-sealing ------------------------------------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(st.sampled_from([b"1", b"2", b"3", b"\x00x", "ü".encode()]), st.binary(max_size=64)),
        min_size=1,
        max_size=20,
    )
)
def test_each_value_is_resealed_under_its_own_subjects_next_version(values: list[tuple[bytes, bytes]]) -> None:
    old = {s: key(s) for s, _ in values}
    new = {s: key(s, 2) for s in old}
    rows = [((str(i),), seal(old[s], pt, AD), s) for i, (s, pt) in enumerate(values)]
    resealed = reseal_subject_batch(rows, opener(*old.values()), new.get, AD)
    assert resealed.unreadable == 0
    assert resealed.keys == [[str(i) for i in range(len(values))]]
    assert resealed.old == [r[1] for r in rows]
    everyone = opener(*new.values())
    for (subject, plaintext), envelope in zip(values, resealed.new, strict=True):
        assert envelope[4:20] == bytes(new[subject].key_id)
        assert everyone.open(envelope, 0, len(envelope), AD) == plaintext
        # the same associated data as before: the column and the subject, so another column fails
        with pytest.raises(OpenFailed):
            everyone.open(envelope, 0, len(envelope), column_associated_data("public.orders.note"))


def test_a_value_moved_to_another_subjects_key_does_not_open() -> None:
    a, b = key(b"1", 2), key(b"2", 2)
    envelope = seal(a, b"x", AD)
    forged = envelope[:4] + bytes(b.key_id) + envelope[20:]  # the header says subject 2's key
    with pytest.raises(OpenFailed):
        opener(a, b).open(forged, 0, len(forged), AD)


def test_rows_without_a_new_key_of_their_subject_or_that_do_not_open_are_left_alone() -> None:
    a1, b1 = key(b"1"), key(b"2")
    wrong = key(b"other", 2)  # a key of another subject must never be used
    good = seal(a1, b"a", AD)
    tampered = bytearray(seal(a1, b"a", AD))
    tampered[-1] ^= 1
    rows = [
        (("1",), good, b"1"),
        (("2",), bytes(tampered), b"1"),
        (("3",), seal(b1, b"b", AD), b"2"),  # subject 2 has no new key (shredded, disabled)
        (("4",), seal(b1, b"b", AD), b"3"),  # the new key named is another subject's
    ]
    new = {b"1": key(b"1", 2), b"3": wrong}
    resealed = reseal_subject_batch(rows, opener(a1, b1), new.get, AD)
    assert resealed.keys == [["1"]]
    assert resealed.old == [good]
    assert resealed.unreadable == 3


# -- the position machine --------------------------------------------------------------------------------------


def start() -> dict[str, object]:
    return {"phase": "rows", "pass": 1, "target": 0, "after": None, "pass_work": 0, "pass_unreadable": 0}


def rows(n: int) -> list[tuple[tuple[str], bytes]]:
    return [((str(i),), b"") for i in range(1, n + 1)]


def test_full_batches_page_on_then_the_next_target_then_the_next_pass() -> None:
    t = target()
    pos, end, _ = advance_position(start(), t, 2, rows(10), 10, 10, 0, 0, 0, 0)
    assert (pos["target"], pos["after"], end) == (0, ["10"], None)
    pos, end, _ = advance_position(pos, t, 2, rows(3), 10, 3, 0, 0, 0, 0)
    assert (pos["target"], pos["after"], pos["pass"], end) == (1, None, 1, None)
    pos, end, _ = advance_position(pos, t, 2, rows(0), 10, 0, 0, 0, 0, 0)
    # the pass did work: another one, from the first target
    assert (pos["target"], pos["after"], pos["pass"], pos["pass_work"], end) == (0, None, 2, 0, None)


def test_a_pass_without_work_leads_to_the_sweep_and_counts_what_it_saw() -> None:
    t = target()
    pos = start() | {"pass": 3}
    pos, end, _ = advance_position(pos, t, 1, rows(4), 10, 0, 0, 0, 3, 1)
    assert end is None
    assert pos["phase"] == "keys"
    assert (pos["current"], pos["shredded"], pos["pass_seen"]) == (3, 1, 4)


def test_compare_and_set_losses_count_as_work_so_another_pass_looks_again() -> None:
    pos, end, _ = advance_position(start(), target(), 1, rows(2), 10, 0, 2, 0, 0, 0)
    assert end is None
    assert pos["pass"] == 2


def test_unreadable_values_fail_the_job_with_a_reason() -> None:
    _pos, end, error = advance_position(start(), target(), 1, rows(2), 10, 0, 0, 2, 0, 0)
    assert end is JobState.FAILED
    assert error is not None
    assert "2 value(s)" in error


def test_writes_under_old_versions_that_never_stop_fail_after_the_last_pass() -> None:
    _pos, end, error = advance_position(start() | {"pass": MAX_PASSES}, target(), 1, rows(1), 10, 1, 0, 0, 0, 0)
    assert end is JobState.FAILED
    assert error is not None
    assert "keystore notifications" in error


# -- SQL ---------------------------------------------------------------------------------------------------------


def test_the_kind_job_pages_every_value_by_the_qualified_key() -> None:
    assert select_all_batch_sql(target(), after=True) == (
        'SELECT t."id"::text, t."email" FROM "public"."customers" AS t WHERE t."email" IS NOT NULL '
        'AND (t."id") > ($2::text::integer) ORDER BY t."id" LIMIT $1'
    )
    assert ">" not in select_all_batch_sql(target(), after=False)
    assert count_under_any_sql(target("orders", "note")) == (
        'SELECT count(*) FROM "public"."orders" WHERE "note" IS NOT NULL '
        'AND substring("note" from 5 for 16) = ANY($1::bytea[])'
    )


# -- status ------------------------------------------------------------------------------------------------------


def test_a_kind_jobs_status_names_its_kind_and_generation() -> None:
    t = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    status = JobStatus(
        job_id=uuid.UUID(int=1), kind="subject", column_id=SCOPE, state=JobState.RUNNING, active=True,
        from_key_id=None, to_key_id=None, to_version=None, rows_done=5, rows_skipped=0, rows_unreadable=0,
        rows_total=10, rows_remaining=5, passes=1, position={}, throttle_rows_per_second=None, batch_size=10,
        last_error=None, created_at=t, updated_at=t, started_at=t, finished_at=None, generation=3,
    )  # fmt: skip
    data = status.to_json()
    assert (data["subject_kind"], data["generation"], data["column"]) == ("customer", 3, SCOPE)
    assert status.fraction == 0.5
