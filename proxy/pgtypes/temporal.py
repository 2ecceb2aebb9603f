"""date, timestamp and timestamptz.

Canonical form: the binary wire format. date: int32 days since 2000-01-01; timestamp: int64
microseconds since 2000-01-01 00:00 (wall clock); timestamptz: int64 microseconds since 2000-01-01
00:00 UTC. Infinities are PostgreSQL's sentinels (INT_MIN / INT_MAX of the width). The range is
PostgreSQL's: 4714-11-24 BC to 5874897 AD for dates, to 294276 AD for timestamps; outside is 22008.

Text input accepts the ISO 8601 forms only, so nothing depends on DateStyle's field order:
``YYYY-MM-DD`` (four or more year digits, one or two month and day digits), optionally followed by
``T`` or spaces and ``HH:MM[:SS[.fraction]]``, then optionally, in any order, a zone and ``AD`` or
``BC``. Zones: ``Z``/``UTC``/``GMT``/``UT``/``Zulu``, numeric offsets as PostgreSQL reads them
(``+02``, ``+0530``, ``+05:30``, ``-08:00:00``; beyond 15 hours is 22009), or a ``Region/City``
name. Special words: ``infinity``, ``-infinity``, ``epoch``. As in PostgreSQL, date ignores a time
and zone, timestamp ignores a zone, timestamptz without a zone reads the time in the session's
TimeZone (a time skipped by a DST change reads with the offset before it, a repeated one with the
offset after it). Fractions beyond microseconds round as PostgreSQL rounds them.

Refused although PostgreSQL accepts them: ``now``/``today``/``tomorrow``/``yesterday`` (0A000: the
value would depend on when the proxy reads it), zone abbreviations other than the UTC ones (22007:
they depend on the server's ``timezone_abbreviations``), and every non-ISO spelling such as
``01/02/2020`` or ``Jan 2 2020`` (22007). Text input and output need DateStyle ISO (any field
order); under another DateStyle they raise 0A000, since PostgreSQL would print the value
differently. Binary input and output work under any DateStyle.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass

from proxy.pgtypes.base import DEFAULT_FORMAT, SessionFormat, ascii_input
from proxy.pgtypes.errors import (
    DatetimeFieldOverflow,
    InvalidBinaryRepresentation,
    InvalidDatetimeFormat,
    InvalidTimeZoneDisplacement,
    UnsupportedValueFormat,
)
from proxy.pgtypes.timezones import Zone, named_zone, session_zone

POSTGRES_EPOCH_JDATE = 2451545
USECS_PER_SEC = 1_000_000
USECS_PER_DAY = 86_400_000_000
DATE_NOBEGIN = -(2**31)
DATE_NOEND = 2**31 - 1
DT_NOBEGIN = -(2**63)
DT_NOEND = 2**63 - 1
# IS_VALID_DATE / IS_VALID_TIMESTAMP.
DATE_MIN = -POSTGRES_EPOCH_JDATE
DATE_END = 2147483494 - POSTGRES_EPOCH_JDATE
MIN_TIMESTAMP = -211813488000000000
END_TIMESTAMP = 9223371331200000000
_JULIAN_MINYEAR, _JULIAN_MINMONTH = -4713, 11
_JULIAN_MAXYEAR, _JULIAN_MAXMONTH = 5874898, 6
_MAX_TZDISP_HOUR = 15
_DAYS_IN_MONTH = (
    (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31),
    (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31),
)

_DATETIME = re.compile(
    r"(\d{4,})-(\d{1,2})-(\d{1,2})"
    r"(?:(?:[Tt]|[ \t\n\r\v\f]+)(\d{1,2}):(\d{1,2})(?::(\d{1,2})(?:\.(\d*+))?)?)?"
)
_TOKEN = re.compile(r"[ \t\n\r\v\f]*+(?:([+-][0-9:]++)|([A-Za-z][A-Za-z0-9_/+\-]*+))")
_OFFSET = re.compile(r"([+-])(\d+)(?::(\d+)(?::(\d+))?)?")
_UTC_WORDS = frozenset(("z", "zulu", "utc", "gmt", "ut"))
_CLOCK_WORDS = frozenset(("now", "today", "tomorrow", "yesterday"))
_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")
_EPOCH_1970_DAYS = -10957
_CSPACE = " \t\n\r\v\f"


# -- calendar -----------------------------------------------------------------------------------


def date2j(year: int, month: int, day: int) -> int:
    """Julian day number of a proleptic Gregorian date (year 0 is 1 BC), as PostgreSQL computes it."""
    if month > 2:
        month += 1
        year += 4800
    else:
        month += 13
        year += 4799
    century = year // 100
    julian = year * 365 - 32167
    julian += year // 4 - century + century // 4
    julian += 7834 * month // 256 + day
    return julian


def j2date(jd: int) -> tuple[int, int, int]:
    """The inverse of date2j, for 0 <= jd (PostgreSQL's j2date)."""
    julian = jd + 32044
    quad = julian // 146097
    extra = (julian - quad * 146097) * 4 + 3
    julian += 60 + quad * 3 + extra // 146097
    quad = julian // 1461
    julian -= quad * 1461
    y = julian * 4 // 1461
    julian = ((julian + 305) % 365 if y != 0 else (julian + 306) % 366) + 123
    y += quad * 4
    quad = julian * 2141 // 65536
    day = julian - 7834 * quad // 256
    month = (quad + 10) % 12 + 1
    return y - 4800, month, day


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _valid_julian(year: int, month: int) -> bool:
    return (year > _JULIAN_MINYEAR or (year == _JULIAN_MINYEAR and month >= _JULIAN_MINMONTH)) and (
        year < _JULIAN_MAXYEAR or (year == _JULIAN_MAXYEAR and month < _JULIAN_MAXMONTH)
    )


# -- parsing ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A parsed input: a special (``"infinity"``, ``"-infinity"``, ``"epoch"``) or fields."""

    special: str | None = None
    year: int = 0
    month: int = 0
    day: int = 0
    time_usecs: int = 0
    zone_offset: int | None = None  # seconds east, when the input gave a numeric offset
    zone: Zone | None = None  # when the input named a zone


def _syntax(sql_name: str) -> InvalidDatetimeFormat:
    return InvalidDatetimeFormat(
        f"invalid input syntax for type {sql_name}",
        hint="Encrypted columns accept ISO 8601 input (YYYY-MM-DD[ HH:MM[:SS[.ffffff]]][+HH[:MM]]).",
    )


def _field_overflow() -> DatetimeFieldOverflow:
    return DatetimeFieldOverflow("date/time field value out of range")


def _parse_offset(token: str) -> int:
    """DecodeTimezone: seconds east of UTC from "+h", "+hh:mm[:ss]" or "+hhmm"."""
    m = _OFFSET.fullmatch(token)
    if m is None:
        raise InvalidDatetimeFormat("invalid time zone displacement")
    sign, hours_text, minutes_text, seconds_text = m.groups()
    if len(hours_text) > 9:
        raise InvalidTimeZoneDisplacement("time zone displacement out of range")
    hours, minutes, seconds = int(hours_text), 0, 0
    if minutes_text is not None:
        if len(minutes_text) > 9 or len(seconds_text or "") > 9:
            raise InvalidTimeZoneDisplacement("time zone displacement out of range")
        minutes = int(minutes_text)
        seconds = int(seconds_text or 0)
    elif len(token) > 3:
        # Run together: "+0530" is 5:30, "+530" too.
        hours, minutes = divmod(hours, 100)
    if hours > _MAX_TZDISP_HOUR or minutes >= 60 or seconds >= 60:
        raise InvalidTimeZoneDisplacement("time zone displacement out of range")
    east = (hours * 60 + minutes) * 60 + seconds
    return -east if sign == "-" else east


def _parse(data: bytes, fmt: SessionFormat, sql_name: str) -> _Parsed:
    _require_iso(fmt.datestyle)
    text = ascii_input(data, fmt, sql_name).decode("ascii").strip(_CSPACE)
    lower = text.lower()
    if lower in ("infinity", "-infinity", "epoch"):
        return _Parsed(special=lower)
    if lower in _CLOCK_WORDS:
        raise UnsupportedValueFormat(
            f'"{lower}" is not supported for encrypted {sql_name} columns',
            hint="Send the value itself; the proxy does not read the clock.",
        )
    m = _DATETIME.match(text)
    if m is None:
        raise _syntax(sql_name)
    year_text, month_text, day_text, hour_text, minute_text, second_text, fraction = m.groups()
    pos = m.end()
    if hour_text is None and pos < len(text) and text[pos] not in _CSPACE:
        raise _syntax(sql_name)

    zone_offset: int | None = None
    zone: Zone | None = None
    era: str | None = None
    while pos < len(text):
        tm = _TOKEN.match(text, pos)
        if tm is None:
            if not text[pos:].strip(_CSPACE):
                break
            raise _syntax(sql_name)
        pos = tm.end()
        offset_token, word = tm.groups()
        has_zone = zone_offset is not None or zone is not None
        if offset_token is not None:
            if has_zone:
                raise _syntax(sql_name)
            zone_offset = _parse_offset(offset_token)
            continue
        lowered = word.lower()
        if lowered in ("ad", "bc"):
            if era is not None:
                raise _syntax(sql_name)
            era = lowered
        elif lowered in _UTC_WORDS and not has_zone:
            zone_offset = 0
        elif "/" in lowered and not has_zone:
            zone = named_zone(word)
        else:
            raise _syntax(sql_name)

    if len(year_text) > 9:
        raise _field_overflow()
    year, month, day = int(year_text), int(month_text), int(day_text)
    # ValidateDate: there is no year zero in AD/BC notation; 1 BC is year 0 internally.
    if year <= 0:
        raise _field_overflow()
    if era == "bc":
        year = 1 - year
    if not 1 <= month <= 12 or not 1 <= day <= 31:
        raise _field_overflow()
    if day > _DAYS_IN_MONTH[_is_leap(year)][month - 1]:
        raise _field_overflow()

    time_usecs = 0
    if hour_text is not None:
        hour, minute = int(hour_text), int(minute_text)
        second = int(second_text) if second_text is not None else 0
        # ParseFractionalSecond: strtod of ".digits", then rint(frac * 1e6).
        fsec = round(float("0." + fraction) * 1_000_000) if fraction else 0
        # time_overflows: 24:00:00 and a leap second 60 are allowed, nothing past 24:00:00.
        if hour > 24 or minute >= 60 or second > 60 or fsec > USECS_PER_SEC:
            raise _field_overflow()
        time_usecs = ((hour * 60 + minute) * 60 + second) * USECS_PER_SEC + fsec
        if time_usecs > USECS_PER_DAY:
            raise _field_overflow()
    return _Parsed(None, year, month, day, time_usecs, zone_offset, zone)


@functools.lru_cache(maxsize=16)
def _datestyle_is_iso(datestyle: str) -> bool:
    return datestyle.split(",")[0].strip().upper() == "ISO"


def _require_iso(datestyle: str) -> None:
    if not _datestyle_is_iso(datestyle):
        raise UnsupportedValueFormat(
            f'DateStyle "{datestyle}" is not supported for encrypted date/time columns in text format',
            hint="Use SET DateStyle = 'ISO' or the binary format.",
        )


def _local_timestamp(parsed: _Parsed) -> int:
    if not _valid_julian(parsed.year, parsed.month):
        raise DatetimeFieldOverflow("timestamp out of range")
    days = date2j(parsed.year, parsed.month, parsed.day) - POSTGRES_EPOCH_JDATE
    return days * USECS_PER_DAY + parsed.time_usecs


def _check_timestamp(value: int) -> int:
    if not MIN_TIMESTAMP <= value < END_TIMESTAMP:
        raise DatetimeFieldOverflow("timestamp out of range")
    return value


# -- output -------------------------------------------------------------------------------------


def _format_date(days: int) -> bytes:
    year, month, day = j2date(days + POSTGRES_EPOCH_JDATE)
    if year > 0:
        return f"{year:04d}-{month:02d}-{day:02d}".encode("ascii")
    return f"{1 - year:04d}-{month:02d}-{day:02d} BC".encode("ascii")


def _format_timestamp(local: int, east: int | None) -> bytes:
    days, usecs = divmod(local, USECS_PER_DAY)
    year, month, day = j2date(days + POSTGRES_EPOCH_JDATE)
    seconds, fsec = divmod(usecs, USECS_PER_SEC)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    text = f"{year if year > 0 else 1 - year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}"
    if fsec:
        text += f".{fsec:06d}".rstrip("0")
    if east is not None:
        text += _format_offset(east)
    if year <= 0:
        text += " BC"
    return text.encode("ascii")


def _format_offset(east: int) -> str:
    """EncodeTimezone: +HH, +HH:MM when minutes are not zero, +HH:MM:SS when seconds are not."""
    sign = "-" if east < 0 else "+"
    minutes, seconds = divmod(abs(east), 60)
    hours, minutes = divmod(minutes, 60)
    if seconds:
        return f"{sign}{hours:02d}:{minutes:02d}:{seconds:02d}"
    if minutes:
        return f"{sign}{hours:02d}:{minutes:02d}"
    return f"{sign}{hours:02d}"


# -- codecs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DateCodec:
    name: str = "date"
    oid: int = 1082
    typlen: int = 4
    typmod: int = -1
    array_oid: int = 1182

    def canonical_from_text(self, data: bytes, fmt: SessionFormat) -> bytes:
        parsed = _parse(data, fmt, "date")
        if parsed.special == "infinity":
            return _INT32.pack(DATE_NOEND)
        if parsed.special == "-infinity":
            return _INT32.pack(DATE_NOBEGIN)
        if parsed.special == "epoch":
            return _INT32.pack(_EPOCH_1970_DAYS)
        if not _valid_julian(parsed.year, parsed.month):
            raise DatetimeFieldOverflow("date out of range")
        days = date2j(parsed.year, parsed.month, parsed.day) - POSTGRES_EPOCH_JDATE
        if not DATE_MIN <= days < DATE_END:
            raise DatetimeFieldOverflow("date out of range")
        return _INT32.pack(days)

    def canonical_from_binary(self, data: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        if len(data) != 4:
            raise InvalidBinaryRepresentation("incorrect binary data format for type date")
        days = _INT32.unpack(data)[0]
        if days not in (DATE_NOBEGIN, DATE_NOEND) and not DATE_MIN <= days < DATE_END:
            raise DatetimeFieldOverflow("date out of range")
        return data

    def to_text(self, canonical: bytes, fmt: SessionFormat) -> bytes:
        _require_iso(fmt.datestyle)
        days = _INT32.unpack(canonical)[0]
        if days == DATE_NOEND:
            return b"infinity"
        if days == DATE_NOBEGIN:
            return b"-infinity"
        return _format_date(days)

    def to_binary(self, canonical: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        return canonical


@dataclass(frozen=True, slots=True)
class TimestampCodec:
    name: str
    oid: int
    array_oid: int
    sql_name: str
    with_zone: bool
    typlen: int = 8
    typmod: int = -1

    def canonical_from_text(self, data: bytes, fmt: SessionFormat) -> bytes:
        parsed = _parse(data, fmt, self.sql_name)
        if parsed.special == "infinity":
            return _INT64.pack(DT_NOEND)
        if parsed.special == "-infinity":
            return _INT64.pack(DT_NOBEGIN)
        if parsed.special == "epoch":
            return _INT64.pack(_EPOCH_1970_DAYS * USECS_PER_DAY)
        local = _local_timestamp(parsed)
        if not self.with_zone:
            return _INT64.pack(_check_timestamp(local))
        if parsed.zone_offset is not None:
            east = parsed.zone_offset
        else:
            zone = parsed.zone if parsed.zone is not None else session_zone(fmt.timezone)
            east = zone.offset_for_local(local // USECS_PER_SEC)
        return _INT64.pack(_check_timestamp(local - east * USECS_PER_SEC))

    def canonical_from_binary(self, data: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        if len(data) != 8:
            raise InvalidBinaryRepresentation(f"incorrect binary data format for type {self.sql_name}")
        value = _INT64.unpack(data)[0]
        if value not in (DT_NOBEGIN, DT_NOEND):
            _check_timestamp(value)
        return data

    def to_text(self, canonical: bytes, fmt: SessionFormat) -> bytes:
        _require_iso(fmt.datestyle)
        value = _INT64.unpack(canonical)[0]
        if value == DT_NOEND:
            return b"infinity"
        if value == DT_NOBEGIN:
            return b"-infinity"
        if not self.with_zone:
            return _format_timestamp(value, None)
        zone = session_zone(fmt.timezone)
        east = zone.offset_at_utc(value // USECS_PER_SEC)
        return _format_timestamp(value + east * USECS_PER_SEC, east)

    def to_binary(self, canonical: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        return canonical


DATE = DateCodec()
TIMESTAMP = TimestampCodec("timestamp", 1114, 1115, "timestamp", with_zone=False)
TIMESTAMPTZ = TimestampCodec("timestamptz", 1184, 1185, "timestamp with time zone", with_zone=True)
