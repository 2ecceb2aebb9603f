"""Canonical subject ids: one subject whatever the type, format and spelling of its id."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keymgmt.envelope import Subject
from proxy.encrypt.subjects import InvalidSubject, subject_from_binary, subject_from_text
from proxy.rewrite.catalog import SubjectColumn

INT = SubjectColumn("customer", "id", "integer")
UUID = SubjectColumn("customer", "id", "uuid")
TEXT = SubjectColumn("customer", "id", "text")


@given(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1))
def test_an_integer_is_one_subject_in_every_form(n: int) -> None:
    expected = Subject("customer", str(n).encode())
    assert subject_from_text("t", INT, str(n).encode()) == expected
    assert subject_from_text("t", INT, f"  {n} ".encode()) == expected
    assert subject_from_binary("t", INT, n.to_bytes(8, "big", signed=True)) == expected
    if -(1 << 31) <= n < (1 << 31):
        assert subject_from_binary("t", INT, n.to_bytes(4, "big", signed=True)) == expected


def test_integer_spellings() -> None:
    assert subject_from_text("t", INT, b"007").subject_id == b"7"
    assert subject_from_text("t", INT, b"+5").subject_id == b"5"
    assert subject_from_text("t", INT, b"-0").subject_id == b"0"


@given(st.uuids())
def test_a_uuid_is_one_subject_in_every_form(u: uuid.UUID) -> None:
    expected = Subject("customer", str(u).encode())
    assert subject_from_text("t", UUID, str(u).upper().encode()) == expected
    assert subject_from_text("t", UUID, u.hex.encode()) == expected
    assert subject_from_text("t", UUID, ("{" + str(u) + "}").encode()) == expected
    assert subject_from_binary("t", UUID, u.bytes) == expected


def test_text_ids_are_their_bytes() -> None:
    assert subject_from_text("t", TEXT, "Zoë".encode()).subject_id == "Zoë".encode()
    assert subject_from_binary("t", TEXT, b"abc").subject_id == b"abc"


@pytest.mark.parametrize(
    ("column", "value"),
    [(INT, b"x"), (INT, b"1.5"), (INT, b"9223372036854775808"), (UUID, b"nope"), (TEXT, b"\xff"), (TEXT, b"a\x00")],
)
def test_an_id_that_is_not_of_its_type_is_refused_without_the_value(column: SubjectColumn, value: bytes) -> None:
    with pytest.raises(InvalidSubject) as e:
        subject_from_text("public.customers", column, value)
    assert e.value.sqlstate == "22P02"
    assert "column id of public.customers" in e.value.message
    if len(value) > 2:
        assert value.decode("latin-1") not in e.value.message


@pytest.mark.parametrize(("column", "value"), [(INT, b"\x00\x01\x02"), (UUID, b"\x00" * 15)])
def test_binary_of_the_wrong_length_is_refused(column: SubjectColumn, value: bytes) -> None:
    with pytest.raises(InvalidSubject):
        subject_from_binary("public.customers", column, value)
