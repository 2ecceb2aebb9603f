from __future__ import annotations

import pytest

from proxy.errors import FeatureNotSupported, ProxyError
from proxy.pgtypes import (
    DEFAULT_FORMAT,
    InvalidTextRepresentation,
    PgTypeError,
    SessionFormat,
    UnknownDeclaredType,
    UnsupportedValueFormat,
    ValueInvalid,
    codec_for,
)

# (declared, name, oid, typlen, typmod, array oid) as a RowDescription and pg_type show them.
DESCRIPTORS = [
    ("text", "text", 25, -1, -1, 1009),
    ("varchar", "varchar", 1043, -1, -1, 1015),
    ("varchar(20)", "varchar(20)", 1043, -1, 24, 1015),
    ("character varying (20)", "varchar(20)", 1043, -1, 24, 1015),
    ("char(3)", "char(3)", 1042, -1, 7, 1014),
    ("char", "char(1)", 1042, -1, 5, 1014),
    ("int2", "int2", 21, 2, -1, 1005),
    ("smallint", "int2", 21, 2, -1, 1005),
    ("INTEGER", "int4", 23, 4, -1, 1007),
    ("bigint", "int8", 20, 8, -1, 1016),
    ("numeric", "numeric", 1700, -1, -1, 1231),
    ("numeric(10,2)", "numeric(10,2)", 1700, -1, 655366, 1231),
    ("decimal(10, 2)", "numeric(10,2)", 1700, -1, 655366, 1231),
    ("numeric(10)", "numeric(10,0)", 1700, -1, 655364, 1231),
    ("real", "float4", 700, 4, -1, 1021),
    ("double  precision", "float8", 701, 8, -1, 1022),
    ("boolean", "bool", 16, 1, -1, 1000),
    ("date", "date", 1082, 4, -1, 1182),
    ("timestamp", "timestamp", 1114, 8, -1, 1115),
    ("timestamp with time zone", "timestamptz", 1184, 8, -1, 1185),
    ("uuid", "uuid", 2950, 16, -1, 2951),
    ("json", "json", 114, -1, -1, 199),
    ("jsonb", "jsonb", 3802, -1, -1, 3807),
    ("bytea", "bytea", 17, -1, -1, 1001),
]


@pytest.mark.parametrize(("declared", "name", "oid", "typlen", "typmod", "array_oid"), DESCRIPTORS)
def test_descriptor(declared: str, name: str, oid: int, typlen: int, typmod: int, array_oid: int) -> None:
    codec = codec_for(declared)
    assert (codec.name, codec.oid, codec.typlen, codec.typmod, codec.array_oid) == (
        name,
        oid,
        typlen,
        typmod,
        array_oid,
    )


@pytest.mark.parametrize(
    "declared",
    [
        "interval",
        "varchar(0)",
        "varchar(10485761)",
        "numeric(0)",
        "numeric(1001)",
        "numeric(5,1001)",
        "char(2,3)",
        "money",
        "int4[]",
        "varchar(x)",
        "",
    ],
)
def test_unknown_or_invalid_declared_types(declared: str) -> None:
    with pytest.raises(UnknownDeclaredType) as excinfo:
        codec_for(declared)
    assert excinfo.value.sqlstate == "42704"


SECRET = "Zq7SECRETvalue"
# One invalid input per codec, each carrying the secret; no error may repeat it.
INVALID_INPUTS = [
    ("int4", SECRET),
    ("int8", "9" * 30 + SECRET),
    ("float8", SECRET),
    ("numeric", "1" + SECRET),
    ("numeric(3,1)", "12345"),
    ("bool", SECRET),
    ("uuid", SECRET),
    ("date", SECRET),
    ("timestamptz", "2020-01-01 10:00 " + SECRET),
    ("timestamptz", "2020-01-01 10:00 " + SECRET + "/Zone"),
    ("json", "{" + SECRET),
    ("jsonb", '"\\ud800' + SECRET + '"'),
    ("bytea", "\\x" + SECRET),
    ("bytea", "\\" + SECRET),
    ("varchar(3)", SECRET),
    ("char(3)", SECRET),
    ("text", SECRET + "\x00"),
]


@pytest.mark.parametrize(("declared", "value"), INVALID_INPUTS)
def test_errors_never_contain_the_value(declared: str, value: str) -> None:
    with pytest.raises(PgTypeError) as excinfo:
        codec_for(declared).canonical_from_text(value.encode(), DEFAULT_FORMAT)
    err = excinfo.value
    assert isinstance(err, ProxyError)
    assert len(err.sqlstate) == 5
    for text in (str(err), err.message, err.detail or "", err.hint or "", repr(err)):
        assert SECRET not in text
        assert "12345" not in text


def test_in_column_names_the_column_and_keeps_the_class() -> None:
    err = InvalidTextRepresentation("invalid input syntax for type date", hint="a hint")
    named = err.in_column("public.people.birthday")
    assert type(named) is InvalidTextRepresentation
    assert named.message == "invalid input syntax for type date in column public.people.birthday"
    assert (named.sqlstate, named.hint) == ("22P02", "a hint")
    assert isinstance(named, ValueInvalid)


def test_unsupported_format_is_a_feature_not_supported() -> None:
    err = UnsupportedValueFormat("x")
    assert isinstance(err, FeatureNotSupported)
    assert isinstance(err, PgTypeError)
    assert err.sqlstate == "0A000"


def test_session_format_from_parameter_status() -> None:
    fmt = SessionFormat()
    fmt = fmt.with_parameter("TimeZone", "Europe/Paris")
    fmt = fmt.with_parameter("DateStyle", "ISO, DMY")
    fmt = fmt.with_parameter("client_encoding", "LATIN1")
    fmt = fmt.with_parameter("standard_conforming_strings", "off")
    fmt = fmt.with_parameter("application_name", "ignored")
    assert fmt == SessionFormat(
        timezone="Europe/Paris", datestyle="ISO, DMY", client_encoding="LATIN1", standard_conforming_strings=False
    )
