"""Per-type value codecs for encrypted columns.

An encrypted column is ``bytea`` in the database and its declared type (``codec_for``) everywhere
else. A codec normalises a plaintext value received in text or binary wire format into one
canonical byte string (what the proxy encrypts and blind-indexes, so the same value sent either way
encrypts and matches the same), and encodes a decrypted canonical value in the format the client
asked for. Everything here is pure: no I/O, no clock, no logging, and no value in any message.

Canonical forms, by type (each module's docstring has the details):

- int2/int4/int8, float4/float8, bool, date, timestamp, timestamptz, uuid: the binary wire format
  (timestamptz in UTC; every NaN collapsed to one).
- text, varchar[(N)], char(N): UTF-8 text after the length rule (char(N) blank-padded).
- numeric[(P,S)]: PostgreSQL's text output, display scale kept.
- bytea: the raw bytes. json: the validated text as given. jsonb: PostgreSQL's jsonb text output.
"""

from proxy.pgtypes.base import DEFAULT_FORMAT, SessionFormat, TypeCodec
from proxy.pgtypes.errors import (
    CharacterNotInRepertoire,
    DatetimeFieldOverflow,
    InvalidBinaryRepresentation,
    InvalidDatetimeFormat,
    InvalidParameterValue,
    InvalidTextRepresentation,
    InvalidTimeZoneDisplacement,
    NumericValueOutOfRange,
    PgTypeError,
    StringDataRightTruncation,
    UnknownDeclaredType,
    UnsupportedValueFormat,
    UntranslatableCharacter,
    ValueInvalid,
)
from proxy.pgtypes.registry import codec_for

__all__ = [
    "DEFAULT_FORMAT",
    "CharacterNotInRepertoire",
    "DatetimeFieldOverflow",
    "InvalidBinaryRepresentation",
    "InvalidDatetimeFormat",
    "InvalidParameterValue",
    "InvalidTextRepresentation",
    "InvalidTimeZoneDisplacement",
    "NumericValueOutOfRange",
    "PgTypeError",
    "SessionFormat",
    "StringDataRightTruncation",
    "TypeCodec",
    "UnknownDeclaredType",
    "UnsupportedValueFormat",
    "UntranslatableCharacter",
    "ValueInvalid",
    "codec_for",
]
