"""Time zone rules for timestamptz: the session's TimeZone and zone names met in input.

A zone is a fixed offset or an IANA zone read with ``zoneinfo`` from the system tz database (the
one Debian's PostgreSQL uses too). Offsets are seconds east of UTC. PostgreSQL covers years -4713
to 294276; ``zoneinfo`` covers 1 to 9999, so instants outside are mapped in: before year 2 every
zone is on its earliest rule (local mean time), and past year 9000 the rules repeat every 400
years (146097 days, a whole number of weeks), which is how PostgreSQL's tz code extends them too.

Accepted TimeZone settings: IANA names (any case), and POSIX-style fixed offsets such as
``<+02>-02`` or ``UTC+3`` (POSIX signs: ``UTC+3`` is three hours west), which is how PostgreSQL
reports ``SET TIME ZONE +2``. Anything else is refused with 0A000.
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

from proxy.pgtypes.errors import InvalidParameterValue, UnsupportedValueFormat

_USECS = 1_000_000
_UNIX_EPOCH_FROM_2000 = 946_684_800  # seconds from 1970-01-01 to 2000-01-01
_CYCLE_SECONDS = 146_097 * 86_400  # 400 Gregorian years
_NAIVE_EPOCH = datetime(2000, 1, 1)
# The span handed to zoneinfo, in seconds since 2000-01-01: years 2 to 9000, clear of its limits.
_EARLIEST = int((datetime(2, 1, 1) - _NAIVE_EPOCH).total_seconds())
_LATEST = int((datetime(9000, 1, 1) - _NAIVE_EPOCH).total_seconds())
_UTC_NAMES = frozenset(
    ("utc", "etc/utc", "gmt", "etc/gmt", "zulu", "etc/zulu", "universal", "etc/universal", "uct", "etc/uct")
)
_POSIX_FIXED = re.compile(r"(?:<[^<>]*>|[A-Za-z]{3,})([+-]?)(\d{1,2})(?::(\d{1,2})(?::(\d{1,2}))?)?")


@dataclass(frozen=True, slots=True)
class Zone:
    """A zone's rules: ``fixed`` seconds east of UTC, or ``rules`` from the tz database."""

    name: str
    fixed: int = 0
    rules: tzinfo | None = None

    def offset_at_utc(self, utc_seconds: int) -> int:
        """Seconds east of UTC in effect at an instant (seconds since 2000-01-01 UTC)."""
        if self.rules is None:
            return self.fixed
        seconds = _into_supported_range(utc_seconds)
        moment = datetime.fromtimestamp(seconds + _UNIX_EPOCH_FROM_2000, self.rules)
        offset = moment.utcoffset()
        assert offset is not None
        return int(offset.total_seconds())

    def offset_for_local(self, local_seconds: int) -> int:
        """The UTC offset for a wall-clock time (seconds since 2000-01-01 local), as PostgreSQL's
        DetermineTimeZoneOffset picks it: a time skipped by a spring-forward transition reads with
        the offset before it, a time repeated by a fall-back transition with the offset after it.
        Both rules come to the same thing: of the two readings, take the later instant."""
        if self.rules is None:
            return self.fixed
        seconds = _into_supported_range(local_seconds)
        wall = _NAIVE_EPOCH + timedelta(seconds=seconds)
        before = wall.replace(tzinfo=self.rules).utcoffset()
        after = wall.replace(tzinfo=self.rules, fold=1).utcoffset()
        assert before is not None
        assert after is not None
        # Later instant = smaller offset east.
        return int(min(before, after).total_seconds())


def _into_supported_range(seconds: int) -> int:
    if seconds < _EARLIEST:
        return _EARLIEST
    if seconds > _LATEST:
        return seconds - ((seconds - _LATEST) // _CYCLE_SECONDS + 1) * _CYCLE_SECONDS
    return seconds


@functools.lru_cache(maxsize=1)
def _zone_names() -> dict[str, str]:
    return {name.lower(): name for name in zoneinfo.available_timezones()}


def _load(key: str) -> tzinfo | None:
    try:
        return zoneinfo.ZoneInfo(key)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return None


def _iana(name: str) -> Zone | None:
    """A tz database zone; PostgreSQL matches zone names case-insensitively."""
    if name.lower() in _UTC_NAMES:
        return Zone(name)
    rules = _load(name) if "." not in name else None
    if rules is None:
        key = _zone_names().get(name.lower())
        if key is None:
            return None
        rules = _load(key)
        if rules is None:
            return None
        name = key
    return Zone(name, rules=rules)


@functools.lru_cache(maxsize=128)
def session_zone(setting: str) -> Zone:
    """The zone a TimeZone setting (as PostgreSQL reports it) names; 0A000 when not supported."""
    zone = _iana(setting)
    if zone is not None:
        return zone
    m = _POSIX_FIXED.fullmatch(setting)
    if m is not None:
        sign, hours, minutes, seconds = m.groups()
        west = int(hours) * 3600 + int(minutes or 0) * 60 + int(seconds or 0)
        return Zone(setting, fixed=west if sign == "-" else -west)
    raise UnsupportedValueFormat(
        f'TimeZone setting "{setting}" is not supported for encrypted timestamptz columns',
        hint="Use an IANA zone name (e.g. 'Europe/Paris') or a fixed offset.",
    )


@functools.lru_cache(maxsize=256)
def named_zone(name: str) -> Zone:
    """A Region/City zone written in a timestamp; unknown names are 22023, as in PostgreSQL."""
    zone = _iana(name)
    if zone is None:
        raise InvalidParameterValue("time zone not recognized")
    return zone
