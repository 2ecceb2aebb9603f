"""The pure parts of DEK rotation: the batch SQL, re-sealing a batch, the throttle, the job status."""

from __future__ import annotations

import datetime
import os
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keymgmt.envelope import DataKey, KeyState, Opener, column_associated_data, open_envelope, seal
from keymgmt.jobs import JOB_LOCK_CLASS, JobState, JobStatus, Throttle, job_lock_key
from keymgmt.rotation import (
    KeyColumn,
    RotationError,
    RotationTarget,
    count_under_sql,
    reseal_batch,
    select_batch_sql,
    update_batch_sql,
)

COLUMN = "public.people.email"


def key(version: int = 1, column: str = COLUMN) -> DataKey:
    return DataKey.from_material(uuid.uuid4().bytes, os.urandom(32), column_id=column, version=version)


def target(*pk: tuple[str, str], table: str = "people", column: str = "email") -> RotationTarget:
    return RotationTarget("public", table, column, "text", tuple(KeyColumn(n, t) for n, t in pk))


# -- SQL ----------------------------------------------------------------------------------------------------


def test_select_orders_and_pages_by_the_qualified_key() -> None:
    sql = select_batch_sql(target(("id", "integer")), after=True)
    assert sql == (
        'SELECT t."id"::text, t."email" FROM "public"."people" AS t WHERE t."email" IS NOT NULL'
        ' AND substring(t."email" from 5 for 16) <> $1 AND (t."id") > ($2::text::integer)'
        ' ORDER BY t."id" LIMIT $3'
    )
    # Qualified, the ORDER BY cannot mean the output column id::text (text order).
    assert "ORDER BY id" not in sql


def test_first_batch_has_no_keyset_predicate() -> None:
    sql = select_batch_sql(target(("a", "text"), ("b", "bigint")), after=False)
    assert ">" not in sql.replace("<>", "")
    assert sql.endswith('ORDER BY t."a", t."b" LIMIT $2')


def test_composite_key_row_comparison_and_compare_and_set() -> None:
    t = target(("a", "text"), ("b", "timestamp with time zone"))
    assert '(t."a", t."b") > ($2::text::text, $3::text::timestamp with time zone)' in select_batch_sql(t, after=True)
    update = update_batch_sql(t)
    assert update == (
        'UPDATE "public"."people" AS t SET "email" = u.pgveil_new FROM unnest($1::text[], $2::text[],'
        " $3::bytea[], $4::bytea[]) AS u(k0, k1, pgveil_old, pgveil_new) WHERE"
        ' t."a" = u.k0::text AND t."b" = u.k1::timestamp with time zone AND t."email" = u.pgveil_old'
    )


def test_names_are_quoted() -> None:
    t = RotationTarget('we"ird', "Ta ble", 'co"l', "text", (KeyColumn('i"d', "integer"),))
    sql = select_batch_sql(t, after=True) + update_batch_sql(t) + count_under_sql(t)
    assert '"we""ird"."Ta ble"' in sql
    assert 't."co""l"' in sql
    assert 't."i""d"' in sql
    assert t.column_id == 'we"ird.Ta ble.co"l'


@pytest.mark.parametrize("bad", ["integer; DROP TABLE x", "text -- x", "int'", 'a"b', "integer)/*", ""], ids=repr)
def test_unexpected_key_type_names_are_refused(bad: str) -> None:
    with pytest.raises(RotationError):
        KeyColumn("id", bad)


@pytest.mark.parametrize(
    "good", ["integer", "character varying(20)", "numeric(10,2)", '"MyType"', "public.thing", "integer[]"]
)
def test_type_names_format_type_spells_are_accepted(good: str) -> None:
    assert KeyColumn("id", good).sql_type == good


def test_a_target_needs_a_primary_key() -> None:
    with pytest.raises(RotationError, match="primary key"):
        RotationTarget("public", "t", "c", "text", ())


names = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=20)


@given(names, names, names, st.lists(st.tuples(names, st.sampled_from(["integer", "text", "uuid"])), min_size=1))
def test_target_round_trips_through_json(schema: str, table: str, column: str, pk: list[tuple[str, str]]) -> None:
    t = RotationTarget(schema, table, column, "varchar(5)", tuple(KeyColumn(n, ty) for n, ty in pk))
    assert RotationTarget.from_json(t.to_json()) == t


# -- re-sealing -------------------------------------------------------------------------------------------------


def test_reseal_puts_every_value_under_the_new_key() -> None:
    old, new = key(1), key(2)
    ad = column_associated_data(COLUMN)
    plaintexts = [f"v{i}".encode() * i for i in range(50)]
    rows = [((str(i),), seal(old, p, ad)) for i, p in enumerate(plaintexts)]
    keys: dict[bytes, DataKey] = {old.key_id: old}
    out = reseal_batch(rows, Opener(keys.get), new, ad)
    assert out.unreadable == 0
    assert out.keys == [[str(i) for i in range(50)]]
    assert out.old == [r[1] for r in rows]
    assert [e[4:20] for e in out.new] == [new.key_id] * 50
    assert [open_envelope(lambda _k: new, e, ad) for e in out.new] == plaintexts


def test_values_that_do_not_open_are_left_alone() -> None:
    old, new = key(1), key(2)
    ad = column_associated_data(COLUMN)
    good = seal(old, b"good", ad)
    tampered = bytearray(seal(old, b"tampered", ad))
    tampered[-1] ^= 1
    other_column = seal(old, b"moved", column_associated_data("public.people.other"))
    unknown_key = seal(key(7), b"unknown", ad)
    disabled = key(3)
    under_disabled = seal(disabled, b"disabled", ad)
    keys: dict[bytes, DataKey] = {old.key_id: old, disabled.key_id: disabled.with_state(KeyState.DISABLED)}
    rows = [(("1",), good), (("2",), bytes(tampered)), (("3",), other_column), (("4",), unknown_key)]
    rows.append((("5",), under_disabled))
    out = reseal_batch(rows, Opener(keys.get), new, ad)
    assert out.unreadable == 4
    assert out.keys == [["1"]]
    assert out.old == [good]


def test_an_empty_batch() -> None:
    nothing: dict[bytes, DataKey] = {}
    out = reseal_batch([], Opener(nothing.get), key(), column_associated_data(COLUMN))
    assert (out.keys, out.old, out.new, out.unreadable) == ([], [], [], 0)


# -- throttle ---------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@given(
    st.integers(1, 50_000),
    st.lists(st.tuples(st.integers(0, 5000), st.floats(0, 2, allow_nan=False)), min_size=1, max_size=40),
)
def test_throttle_never_lets_a_job_run_faster_than_its_rate(rate: int, batches: list[tuple[int, float]]) -> None:
    clock = FakeClock()
    throttle = Throttle(rate, clock)
    start = clock.now
    rows = 0
    for n, work in batches:
        clock.now += work  # the batch itself
        rows += n
        delay = throttle.delay(n)
        assert delay >= 0
        clock.now += delay  # the sleep
        assert rows / rate <= clock.now - start + 1e-6


def test_throttle_does_not_make_up_for_a_stall() -> None:
    clock = FakeClock()
    throttle = Throttle(1000, clock)
    assert throttle.delay(1000) == pytest.approx(1.0)
    clock.now += 60  # paused for a minute
    assert throttle.delay(1000) == pytest.approx(1.0)  # not a burst of 60,000 rows


@pytest.mark.parametrize("rate", [None, 0])
def test_no_throttle(rate: int | None) -> None:
    assert Throttle(rate).delay(10**9) == 0.0


def test_negative_throttle_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Throttle(-1)


# -- job status -----------------------------------------------------------------------------------------------


def status(**kw: object) -> JobStatus:
    t = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    fields: dict[str, object] = {
        "job_id": uuid.uuid4(),
        "kind": "dek",
        "column_id": COLUMN,
        "state": JobState.RUNNING,
        "active": True,
        "from_key_id": uuid.uuid4(),
        "to_key_id": uuid.uuid4(),
        "to_version": 2,
        "rows_done": 250,
        "rows_skipped": 0,
        "rows_unreadable": 0,
        "rows_total": 1000,
        "rows_remaining": 750,
        "passes": 1,
        "position": {"pass": 1, "after": ["250"]},
        "throttle_rows_per_second": 100,
        "batch_size": 50,
        "last_error": None,
        "created_at": t,
        "updated_at": t + datetime.timedelta(seconds=5),
        "started_at": t + datetime.timedelta(seconds=2.5),
        "finished_at": None,
    }
    fields.update(kw)
    return JobStatus(**fields)  # type: ignore[arg-type]


def test_status_json() -> None:
    s = status()
    j = s.to_json()
    assert j["fraction"] == 0.25
    assert j["rate_rows_per_second"] == 100.0
    assert j["eta_seconds"] == 7.5
    assert j["interrupted"] is False
    assert j["position"] == {"pass": 1, "after": ["250"]}
    assert j["started_at"] == "2026-01-01T00:00:02.500000+00:00"


def test_running_without_a_runner_is_interrupted() -> None:
    assert status(active=False).interrupted
    assert not status(active=False, state=JobState.PAUSED).interrupted


def test_fraction_before_counting_and_when_done() -> None:
    assert status(rows_remaining=None, rows_total=None).fraction is None
    assert status(state=JobState.DONE, rows_remaining=0).fraction == 1.0
    assert status(rows_done=0, rows_remaining=0).fraction == 1.0


def test_lock_key_is_two_int4() -> None:
    for _ in range(100):
        cls, obj = job_lock_key(uuid.uuid4())
        assert cls == JOB_LOCK_CLASS
        assert -(2**31) <= obj < 2**31
