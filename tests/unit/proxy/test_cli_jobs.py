"""``pgveil keys rotate`` / ``jobs``: choosing columns from the configuration, the progress bar, the parser."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path

import pytest

from keymgmt.errors import KeyManagementError
from keymgmt.jobs import JobState, JobStatus
from proxy.cli import build_parser
from proxy.cli_jobs import describe, refuse_subject_columns, render_bar, select_columns, subject_kind_columns
from proxy.config import Config, parse_config


def config() -> Config:
    return parse_config(
        {
            "tables": {
                "public.people": {
                    "columns": {"email": {"type": "text", "encrypt": True}, "born": {"type": "date", "encrypt": True}}
                },
                "public.orders": {"columns": {"note": {"type": "text", "encrypt": True}, "plain": {"type": "text"}}},
            }
        },
        base_dir=Path.cwd(),
        environ={},
    )


def test_columns_and_tables_select_encrypted_columns_once() -> None:
    chosen = select_columns(config(), ["public.people.email"], ["public.people", "public.orders"])
    assert chosen == [
        ("public", "people", "email", "text"),
        ("public", "people", "born", "date"),
        ("public", "orders", "note", "text"),
    ]


@pytest.mark.parametrize(
    ("columns", "tables", "message"),
    [
        (["public.orders.plain"], [], "not an encrypted column"),
        (["public.nope.x"], [], "not an encrypted column"),
        ([], ["public.nope"], "not a table with encrypted columns"),
        ([], [], "name at least one"),
    ],
)
def test_what_is_not_an_encrypted_column_is_refused(columns: list[str], tables: list[str], message: str) -> None:
    with pytest.raises(KeyManagementError, match=message):
        select_columns(config(), columns, tables)


def status(**kw: object) -> JobStatus:
    t = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    fields: dict[str, object] = {
        "job_id": uuid.UUID(int=7),
        "kind": "dek",
        "column_id": "public.people.email",
        "state": JobState.RUNNING,
        "active": True,
        "from_key_id": None,
        "to_key_id": None,
        "to_version": 3,
        "rows_done": 500,
        "rows_skipped": 2,
        "rows_unreadable": 0,
        "rows_total": 1000,
        "rows_remaining": 498,
        "passes": 1,
        "position": None,
        "throttle_rows_per_second": None,
        "batch_size": 100,
        "last_error": None,
        "created_at": t,
        "updated_at": t,
        "started_at": None,
        "finished_at": None,
    }
    fields.update(kw)
    return JobStatus(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("width", [40, 80, 200])
def test_bar_fits_the_terminal(width: int) -> None:
    line = render_bar(status(), width, rate=1234.0)
    if width >= 80:
        assert "public.people.email v3 500/1,000" in line
    assert len(line) < width
    assert line.startswith("[")
    assert "  50%" in line
    assert "#" in line


def test_bar_names_states_other_than_running() -> None:
    assert "[paused]" in render_bar(status(state=JobState.PAUSED), 120)
    assert "[interrupted]" in render_bar(status(active=False), 120)
    assert " 100%" in render_bar(status(state=JobState.DONE, rows_remaining=0), 120)


def test_describe_line() -> None:
    line = describe(status(rows_unreadable=3, last_error="boom"))
    assert str(uuid.UUID(int=7)) in line
    assert "500 re-encrypted" in line
    assert "2 skipped" in line
    assert "3 unreadable" in line
    assert "(boom)" in line


def test_parser_has_the_commands() -> None:
    parser = build_parser()
    args = parser.parse_args(["keys", "rotate", "--column", "public.people.email", "--throttle", "0"])
    assert (args.column, args.throttle, args.throttle_given, args.no_run) == (["public.people.email"], 0, True, False)
    args = parser.parse_args(["keys", "rotate", "--table", "public.people"])
    assert args.throttle_given is False
    args = parser.parse_args(["jobs", "status", "--json"])
    assert args.json is True
    args = parser.parse_args(["keys", "destroy", "--column", "public.people.email", "--version", "1"])
    assert args.version == 1
    for sub in ("pause", "resume", "cancel"):
        assert parser.parse_args(["jobs", sub, str(uuid.UUID(int=1))]).job_id == str(uuid.UUID(int=1))


def subject_config() -> Config:
    return parse_config(
        {
            "tables": {
                "public.customers": {
                    "subject": {"kind": "customer", "column": "id"},
                    "columns": {"email": {"type": "text", "encrypt": True}, "tier": {"type": "text"}},
                },
                "public.orders": {
                    "subject": {"kind": "customer", "column": "customer_id"},
                    "columns": {"note": {"type": "text", "encrypt": True}},
                },
                "public.accounts": {
                    "subject": {"kind": "account", "column": "id"},
                    "columns": {"secret": {"type": "text", "encrypt": True}},
                },
                "public.people": {"columns": {"email": {"type": "text", "encrypt": True}}},
            }
        },
        base_dir=Path.cwd(),
        environ={},
    )


def test_a_subject_kind_names_every_encrypted_column_of_every_table_of_the_kind() -> None:
    assert subject_kind_columns(subject_config(), "customer") == [
        ("public", "customers", "email", "text"),
        ("public", "orders", "note", "text"),
    ]
    assert subject_kind_columns(subject_config(), "account") == [("public", "accounts", "secret", "text")]
    with pytest.raises(
        KeyManagementError, match=r"subject kind nope with encrypted columns \(kinds: account, customer\)"
    ):
        subject_kind_columns(subject_config(), "nope")


@pytest.mark.parametrize(("columns", "tables"), [(["public.orders.note"], []), ([], ["public.customers"])])
def test_column_and_table_forms_refuse_per_subject_keys_and_name_the_kind(
    columns: list[str], tables: list[str]
) -> None:
    chosen = select_columns(subject_config(), columns, tables)
    with pytest.raises(KeyManagementError, match=r"per-subject keys .* kind customer") as caught:
        refuse_subject_columns(subject_config(), chosen)
    assert caught.value.hint == "pgveil keys rotate --subject-kind customer"
    refuse_subject_columns(subject_config(), select_columns(subject_config(), [], ["public.people"]))  # column keys


def test_parser_has_the_subject_kind_forms() -> None:
    parser = build_parser()
    assert parser.parse_args(["keys", "rotate", "--subject-kind", "customer"]).subject_kind == "customer"
    args = parser.parse_args(["keys", "destroy", "--subject-kind", "customer"])
    assert (args.subject_kind, args.column, args.version) == ("customer", None, None)
    assert parser.parse_args(["keys", "versions", "--subject-kind", "customer"]).subject_kind == "customer"


def test_a_kind_jobs_bar_and_line_name_the_kind_and_generation() -> None:
    s = status(kind="subject", column_id="pgveil.subject.customer", to_version=None, generation=4)
    assert "subject kind customer generation 4 500/1,000" in render_bar(s, 200)
    assert "generation 4" in describe(s)
