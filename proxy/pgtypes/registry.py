"""Maps a declared column type (as written in the configuration) to its codec.

Accepts PostgreSQL's spellings, case-insensitively and with free spacing: the short names
(``int4``, ``varchar(20)``, ``numeric(10,2)``, ``char(3)``, ``timestamptz``) and the SQL ones
(``integer``, ``character varying(20)``, ``decimal(10,2)``, ``character(3)``,
``timestamp with time zone``). ``char``/``character`` without a length is ``char(1)``, as in SQL;
``bpchar`` without a length is blank-padded text of any length. Typmod limits are PostgreSQL 15's.
"""

from __future__ import annotations

import functools
import re

from proxy.pgtypes.base import TypeCodec
from proxy.pgtypes.bytea import BYTEA
from proxy.pgtypes.errors import UnknownDeclaredType
from proxy.pgtypes.floating import FLOAT4, FLOAT8
from proxy.pgtypes.integer import INT2, INT4, INT8
from proxy.pgtypes.jsontypes import JSON, JSONB
from proxy.pgtypes.numeric import NUMERIC, numeric_codec
from proxy.pgtypes.scalars import BOOL, UUID
from proxy.pgtypes.temporal import DATE, TIMESTAMP, TIMESTAMPTZ
from proxy.pgtypes.text import BPCHAR, TEXT, VARCHAR, char_codec, varchar_codec

_PLAIN: dict[str, TypeCodec] = {
    "text": TEXT,
    "varchar": VARCHAR,
    "character varying": VARCHAR,
    "bpchar": BPCHAR,
    "int2": INT2,
    "smallint": INT2,
    "int4": INT4,
    "int": INT4,
    "integer": INT4,
    "int8": INT8,
    "bigint": INT8,
    "numeric": NUMERIC,
    "decimal": NUMERIC,
    "float4": FLOAT4,
    "real": FLOAT4,
    "float8": FLOAT8,
    "double precision": FLOAT8,
    "float": FLOAT8,
    "bool": BOOL,
    "boolean": BOOL,
    "date": DATE,
    "timestamp": TIMESTAMP,
    "timestamp without time zone": TIMESTAMP,
    "timestamptz": TIMESTAMPTZ,
    "timestamp with time zone": TIMESTAMPTZ,
    "uuid": UUID,
    "json": JSON,
    "jsonb": JSONB,
    "bytea": BYTEA,
}
_VARCHAR_NAMES = frozenset(("varchar", "character varying"))
_CHAR_NAMES = frozenset(("char", "character", "bpchar"))
_NUMERIC_NAMES = frozenset(("numeric", "decimal"))
_WITH_MODIFIERS = re.compile(r"([a-z ]+?)\s*\(\s*([+-]?\d+)\s*(?:,\s*([+-]?\d+)\s*)?\)")
_MAX_VARCHAR = 10 * 1024 * 1024
_MAX_NUMERIC_PRECISION = 1000


@functools.lru_cache(maxsize=256)
def codec_for(declared_type: str) -> TypeCodec:
    """The codec for a declared type; raises UnknownDeclaredType (42704) for anything else."""
    spelled = " ".join(declared_type.lower().split())
    plain = _PLAIN.get(spelled)
    if plain is not None:
        return plain
    if spelled in ("char", "character"):
        return char_codec(1)
    m = _WITH_MODIFIERS.fullmatch(spelled)
    if m is None:
        raise UnknownDeclaredType(f'type "{declared_type}" is not supported for encrypted columns')
    base, first, second = m.group(1).strip(), int(m.group(2)), m.group(3)
    if base in _VARCHAR_NAMES or base in _CHAR_NAMES:
        if second is not None or not 1 <= first <= _MAX_VARCHAR:
            raise UnknownDeclaredType(f'invalid length in type "{declared_type}"')
        return varchar_codec(first) if base in _VARCHAR_NAMES else char_codec(first)
    if base in _NUMERIC_NAMES:
        scale = int(second) if second is not None else 0
        if not 1 <= first <= _MAX_NUMERIC_PRECISION or not -1000 <= scale <= 1000:
            raise UnknownDeclaredType(f'invalid precision or scale in type "{declared_type}"')
        return numeric_codec(first, scale)
    raise UnknownDeclaredType(f'type "{declared_type}" is not supported for encrypted columns')
