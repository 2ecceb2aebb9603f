from __future__ import annotations

import struct

import pytest

from proxy.pgtypes import (
    DEFAULT_FORMAT,
    DatetimeFieldOverflow,
    InvalidBinaryRepresentation,
    InvalidDatetimeFormat,
    InvalidParameterValue,
    InvalidTimeZoneDisplacement,
    SessionFormat,
    UnsupportedValueFormat,
    codec_for,
)
from proxy.pgtypes.temporal import date2j, j2date

DATE = codec_for("date")
TIMESTAMP = codec_for("timestamp")
TIMESTAMPTZ = codec_for("timestamptz")
NEW_YORK = SessionFormat(timezone="America/New_York")
USECS = 1_000_000


def _ts(canonical: bytes) -> int:
    return int(struct.unpack(">q", canonical)[0])


def test_julian_day_round_trip() -> None:
    for jd in (0, 1, 2451545, 2440588, 5373484, 2147483493):
        assert date2j(*j2date(jd)) == jd
    assert date2j(2000, 1, 1) == 2451545
    assert j2date(0) == (-4713, 11, 24)


@pytest.mark.parametrize(
    ("text", "output"),
    [
        (b"2020-01-01", b"2020-01-01"),
        (b"2020-1-2", b"2020-01-02"),
        (b" 2020-02-29 ", b"2020-02-29"),
        (b"0044-03-15 BC", b"0044-03-15 BC"),
        (b"0001-01-01 bc", b"0001-01-01 BC"),
        (b"4714-11-24 BC", b"4714-11-24 BC"),
        (b"5874897-12-31", b"5874897-12-31"),
        (b"10000-01-01", b"10000-01-01"),
        (b"2020-01-01T23:59:59Z", b"2020-01-01"),
        (b"2020-01-01 10:00 Europe/Paris", b"2020-01-01"),
        (b"Infinity", b"infinity"),
        (b"-infinity", b"-infinity"),
        (b"epoch", b"1970-01-01"),
    ],
)
def test_date(text: bytes, output: bytes) -> None:
    canonical = DATE.canonical_from_text(text, DEFAULT_FORMAT)
    assert DATE.to_text(canonical, DEFAULT_FORMAT) == output
    assert DATE.canonical_from_binary(DATE.to_binary(canonical)) == canonical


def test_date_binary() -> None:
    assert DATE.canonical_from_text(b"2000-01-02", DEFAULT_FORMAT) == b"\x00\x00\x00\x01"
    assert DATE.canonical_from_text(b"infinity", DEFAULT_FORMAT) == b"\x7f\xff\xff\xff"
    with pytest.raises(DatetimeFieldOverflow):
        DATE.canonical_from_binary(struct.pack(">i", -2451546))
    with pytest.raises(InvalidBinaryRepresentation):
        DATE.canonical_from_binary(b"\x00\x00\x00")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (b"2019-02-29", DatetimeFieldOverflow),
        (b"2020-13-01", DatetimeFieldOverflow),
        (b"0000-01-01", DatetimeFieldOverflow),
        (b"4714-11-23 BC", DatetimeFieldOverflow),
        (b"5874898-01-01", DatetimeFieldOverflow),
        (b"2020-01-01 25:00", DatetimeFieldOverflow),
        (b"2020-01-01 10:00 +16", InvalidTimeZoneDisplacement),
        (b"2020-01-01 10:00 Not/AZone", InvalidParameterValue),
        (b"2020-01-01x", InvalidDatetimeFormat),
        (b"+infinity", InvalidDatetimeFormat),
        (b"01/02/2020", InvalidDatetimeFormat),
        (b"Jan 2 2020", InvalidDatetimeFormat),
        (b"20-01-02", InvalidDatetimeFormat),
        (b"2020-01-02 PST", InvalidDatetimeFormat),
        (b"today", UnsupportedValueFormat),
        (b"now", UnsupportedValueFormat),
    ],
)
def test_date_errors(text: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        DATE.canonical_from_text(text, DEFAULT_FORMAT)


@pytest.mark.parametrize(
    ("text", "output"),
    [
        (b"2020-01-01", b"2020-01-01 00:00:00"),
        (b"2020-01-01T10:00", b"2020-01-01 10:00:00"),
        (b"2020-01-01 10:00:00.5", b"2020-01-01 10:00:00.5"),
        (b"2020-01-01 10:00:00.", b"2020-01-01 10:00:00"),
        (b"2020-01-01 10:00:00.1234565", b"2020-01-01 10:00:00.123456"),
        (b"2020-01-01 10:00:00.1234575", b"2020-01-01 10:00:00.123458"),
        (b"2020-01-01 23:59:59.9999999", b"2020-01-02 00:00:00"),
        (b"2020-01-01 23:59:60", b"2020-01-02 00:00:00"),
        (b"2020-01-01 24:00:00", b"2020-01-02 00:00:00"),
        (b"2020-01-01 10:00+02", b"2020-01-01 10:00:00"),
        (b"0044-03-15 10:00 BC", b"0044-03-15 10:00:00 BC"),
        (b"294276-12-31 23:59:59.999999", b"294276-12-31 23:59:59.999999"),
        (b"epoch", b"1970-01-01 00:00:00"),
    ],
)
def test_timestamp(text: bytes, output: bytes) -> None:
    canonical = TIMESTAMP.canonical_from_text(text, DEFAULT_FORMAT)
    assert TIMESTAMP.to_text(canonical, DEFAULT_FORMAT) == output


@pytest.mark.parametrize(
    "text", [b"2020-01-01 23:59:60.5", b"2020-01-01 24:00:01", b"2020-01-01 10:60", b"294277-01-01 00:00:00"]
)
def test_timestamp_overflow(text: bytes) -> None:
    with pytest.raises(DatetimeFieldOverflow):
        TIMESTAMP.canonical_from_text(text, DEFAULT_FORMAT)


@pytest.mark.parametrize(
    ("text", "fmt", "output"),
    [
        (b"2020-01-01 10:00+02", DEFAULT_FORMAT, b"2020-01-01 08:00:00+00"),
        (b"2020-01-01 10:00 +0530", DEFAULT_FORMAT, b"2020-01-01 04:30:00+00"),
        (b"2020-01-01 10:00 +530", DEFAULT_FORMAT, b"2020-01-01 04:30:00+00"),
        (b"2020-01-01 10:00+05:30:15", DEFAULT_FORMAT, b"2020-01-01 04:29:45+00"),
        (b"2020-01-01 10:00 z", NEW_YORK, b"2020-01-01 05:00:00-05"),
        (b"2020-01-01 10:00", NEW_YORK, b"2020-01-01 10:00:00-05"),
        (b"2020-07-01 10:00", NEW_YORK, b"2020-07-01 10:00:00-04"),
        # Skipped by spring-forward: read with the offset before the change.
        (b"2020-03-08 02:30", NEW_YORK, b"2020-03-08 03:30:00-04"),
        # Repeated by fall-back: read with the offset after the change.
        (b"2020-11-01 01:30", NEW_YORK, b"2020-11-01 01:30:00-05"),
        (b"1800-01-01 00:00:00+00", NEW_YORK, b"1799-12-31 19:03:58-04:56:02"),
        (b"0044-03-15 10:00:00+00 BC", NEW_YORK, b"0044-03-15 05:03:58-04:56:02 BC"),
        (b"200000-07-01 12:00+00", NEW_YORK, b"200000-07-01 08:00:00-04"),
        (b"2020-01-01 00:00+00", SessionFormat(timezone="Asia/Kolkata"), b"2020-01-01 05:30:00+05:30"),
        (b"2020-01-01 00:00+00", SessionFormat(timezone="<+02>-02"), b"2020-01-01 02:00:00+02"),
        (b"2020-01-01 00:00+00", SessionFormat(timezone="UTC+3"), b"2019-12-31 21:00:00-03"),
        (b"2020-01-01 10:00 europe/paris", DEFAULT_FORMAT, b"2020-01-01 09:00:00+00"),
        (b"epoch", NEW_YORK, b"1969-12-31 19:00:00-05"),
        (b"infinity", NEW_YORK, b"infinity"),
    ],
)
def test_timestamptz(text: bytes, fmt: SessionFormat, output: bytes) -> None:
    canonical = TIMESTAMPTZ.canonical_from_text(text, fmt)
    assert TIMESTAMPTZ.to_text(canonical, fmt) == output
    # Reading the output back gives the same instant whatever the session zone.
    assert TIMESTAMPTZ.canonical_from_text(output, DEFAULT_FORMAT) == canonical


def test_timestamptz_is_utc_microseconds() -> None:
    canonical = TIMESTAMPTZ.canonical_from_text(b"2000-01-01 01:00:00.000001+01", DEFAULT_FORMAT)
    assert _ts(canonical) == 1
    assert TIMESTAMPTZ.canonical_from_text(b"-infinity", DEFAULT_FORMAT) == b"\x80" + b"\x00" * 7


def test_binary_range_checks() -> None:
    with pytest.raises(DatetimeFieldOverflow):
        TIMESTAMP.canonical_from_binary(struct.pack(">q", 9223371331200000000))
    assert TIMESTAMP.canonical_from_binary(struct.pack(">q", 2**63 - 1)) == struct.pack(">q", 2**63 - 1)
    with pytest.raises(InvalidBinaryRepresentation):
        TIMESTAMPTZ.canonical_from_binary(b"\x00" * 4)


def test_non_iso_datestyle_is_refused_for_text_only() -> None:
    german = SessionFormat(datestyle="German, DMY")
    canonical = DATE.canonical_from_text(b"2020-01-02", DEFAULT_FORMAT)
    with pytest.raises(UnsupportedValueFormat):
        DATE.to_text(canonical, german)
    with pytest.raises(UnsupportedValueFormat):
        DATE.canonical_from_text(b"2020-01-02", german)
    with pytest.raises(UnsupportedValueFormat):
        TIMESTAMPTZ.to_text(b"\x00" * 8, german)
    assert DATE.to_binary(canonical, german) == canonical
    assert DATE.to_text(canonical, SessionFormat(datestyle="iso, dmy")) == b"2020-01-02"


def test_unsupported_session_timezone() -> None:
    with pytest.raises(UnsupportedValueFormat):
        TIMESTAMPTZ.to_text(b"\x00" * 8, SessionFormat(timezone="EST5EDT,M3.2.0,M11.1.0"))
