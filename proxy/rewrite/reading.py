"""Whether pgveil can read a statement text exactly as the server will, given the session's settings.

pgveil's analysis (libpg_query) reads every text as PostgreSQL does with ``standard_conforming_strings
= on`` and an ASCII-safe client encoding. Two session settings can make the server read the same bytes
differently, so that a text pgveil takes for one harmless statement is several to the server:

- ``standard_conforming_strings = off``: a backslash in ``'...'`` escapes the next character, so
  ``'\\'`` does not end where pgveil thinks it ends (and ``U&'...'`` is rejected).
- a client encoding whose multibyte characters may contain bytes below 0x80 (SJIS, SHIFT_JIS_2004,
  BIG5, GBK, UHC, GB18030, JOHAB; PostgreSQL allows them only as client encodings for that reason):
  the server converts the text to its own encoding before it scans it, and a byte that looked like
  a backslash (or a letter of ``E'``) becomes part of a character.

Decisions
---------
- A text is accepted when its reading is the same under every value the settings may have when the
  server reads it: the one last reported by ParameterStatus, and, while requests are still unanswered
  (``certain`` False: a pipelined ``SET`` may apply first), every other value too. "The same" means
  the PostgreSQL 15 scanner (lexer.py) gives identical token boundaries and escape modes; a scanner
  error under ``standard_conforming_strings = off`` counts as a difference (pgveil could otherwise
  rewrite a literal the server would have rejected into one it accepts). Under another encoding's
  segmentation a scanner error is tolerated: those bytes fail the server's conversion or scan, so it
  runs none of the text, and non-ASCII text next to a quote would otherwise be refused in every
  pipeline.
- ``standard_conforming_strings = off`` is supported by that rule rather than by a second grammar:
  a text reads the same under both values unless a ``'...'`` string contains a backslash or ``U&'``
  occurs (the server rejects ``U&'`` with the setting off), which pgveil refuses while tables have
  encrypted columns. Most texts contain neither, so the session works; pgveil never has to compute a
  value the way the off mode would.
- An encoding that is not ASCII-safe cannot be read with certainty by pgveil at all: any text with a
  byte >= 0x80 is refused in it. A pure-ASCII text reads the same in every PostgreSQL client encoding
  (all of them are ASCII-compatible below 0x80 and start multibyte characters at 0x80 or above), so
  it is accepted: the session can still ``SET client_encoding = 'UTF8'``.
- Refusals carry SQLSTATE 0A000 and never show the text.

Must not: do I/O, keep state, or put statement text in messages. The caller applies this only while
protected tables exist.
"""

from __future__ import annotations

import functools
import re

from proxy.errors import FeatureNotSupported, ProxyError, RefusalReason
from proxy.rewrite.lexer import Scan, scan

__all__ = ["ascii_safe", "reading_refusal", "server_view", "version_refusal"]

# PostgreSQL's server encodings (pg_wchar.h, PG_VALID_BE_ENCODING): every byte below 0x80 is an ASCII
# character in them. Canonical names as ParameterStatus reports them, compared as PostgreSQL compares
# encoding names (case and non-alphanumerics ignored).
_ASCII_SAFE = frozenset(
    {
        "SQLASCII",
        "UTF8",
        "UNICODE",
        "EUCJP",
        "EUCCN",
        "EUCKR",
        "EUCTW",
        "EUCJIS2004",
        "MULEINTERNAL",
        *(f"LATIN{i}" for i in range(1, 11)),
        "ISO88595",
        "ISO88596",
        "ISO88597",
        "ISO88598",
        "WIN866",
        "WIN874",
        *(f"WIN{i}" for i in range(1250, 1259)),
        "KOI8R",
        "KOI8U",
    }
)

# How the client-only encodings cut bytes into characters (pg_wchar.c, pg_*_mblen): a lead byte and the
# bytes it takes with it, whatever their value. Matching left to right without overlap is exactly
# PostgreSQL's walk over the text; bytes below 0x80 that a lead byte takes are what can move a boundary.
_SJIS = re.compile(rb"[\x80-\xa0\xe0-\xff][\x00-\xff]")  # 0xa1-0xdf: one-byte kana
_DOUBLE = re.compile(rb"[\x80-\xff][\x00-\xff]")
_GB18030 = re.compile(rb"[\x80-\xff][\x30-\x39][\x00-\xff][\x00-\xff]|[\x80-\xff][\x00-\xff]")
_JOHAB = re.compile(rb"\x8f[\x00-\xff][\x00-\xff]|[\x80-\xff][\x00-\xff]")  # pg_euc_mblen
_SEGMENTATION_OF = {
    "SJIS": _SJIS,
    "SHIFTJIS2004": _SJIS,
    "BIG5": _DOUBLE,
    "GBK": _DOUBLE,
    "UHC": _DOUBLE,
    "GB18030": _GB18030,
    "JOHAB": _JOHAB,
}
_SEGMENTATIONS: tuple[re.Pattern[bytes], ...] = (_SJIS, _DOUBLE, _GB18030, _JOHAB)
_HIGH_THEN_ASCII = re.compile(rb"[\x80-\xff][\x00-\x7f]")
_SWALLOWED = bytes.maketrans(bytes(range(128)), b"\x80" * 128)


def _normalise(encoding: str) -> str:
    return "".join(ch for ch in encoding.upper() if ch.isalnum())


@functools.lru_cache(maxsize=64)
def ascii_safe(client_encoding: str) -> bool:
    """Whether every byte below 0x80 is an ASCII character in this encoding (unknown names: False)."""
    return _normalise(client_encoding) in _ASCII_SAFE


def server_view(raw: bytes, client_encoding: str) -> str:
    """``raw`` as the server's scanner sees it in ``client_encoding``, one character per byte: ASCII
    where the server sees an ASCII character, U+0080 or above where it sees part of a multibyte one."""
    pattern = _SEGMENTATION_OF.get(_normalise(client_encoding))
    if pattern is not None:
        raw = _segmented(pattern, raw)
    return raw.decode("latin-1")


def _segmented(pattern: re.Pattern[bytes], raw: bytes) -> bytes:
    return pattern.sub(lambda m: m.group().translate(_SWALLOWED), raw)


def reading_refusal(
    sql: str, *, standard_conforming_strings: bool, client_encoding: str, certain: bool
) -> FeatureNotSupported | None:
    """None if the server will read ``sql`` as pgveil does; otherwise the refusal to report.

    ``sql`` is the text as the codec decodes it (UTF-8, other bytes kept as surrogate escapes);
    ``certain`` is False while requests the server has not answered could still change the settings.
    """
    ascii_text = sql.isascii()
    if not ascii_safe(client_encoding):
        if not ascii_text:
            return FeatureNotSupported(
                f'pgveil: statements with non-ASCII text are refused in client_encoding "{client_encoding}" '
                "while tables have encrypted columns: its multibyte characters can contain quote or backslash bytes",
                hint="SET client_encoding = 'UTF8'",
                reason=RefusalReason.ENCODING,
            )
        if "\\'" in sql:
            # backslash_quote = safe_encoding (the default) makes the server reject \' in these encodings.
            return FeatureNotSupported(
                f'pgveil: a backslash before a quote is refused in client_encoding "{client_encoding}" while '
                "tables have encrypted columns (the server rejects it there)",
                hint="write a quote in a string as ''",
                reason=RefusalReason.ENCODING,
            )
    scs_may_be_off = not (certain and standard_conforming_strings)
    scs_matters = scs_may_be_off and ("\\" in sql or "u&'" in sql.lower())
    raw: bytes | None = None
    encoding_matters = False
    if not certain and not ascii_text:
        raw = sql.encode("utf-8", "surrogateescape")
        encoding_matters = _HIGH_THEN_ASCII.search(raw) is not None
    if not scs_matters and not encoding_matters:
        return None
    if len(sql) <= _CACHED_LENGTH:
        differs = _cached_compare(sql, raw is not None, scs_may_be_off)
    else:
        differs = _compare(sql if raw is None else raw.decode("latin-1"), raw, scs_may_be_off)
    return None if differs is None else _differs(certain, encoding=differs == "encoding")


# Texts up to this length have their comparison cached (a pipeline sends the same texts again and again);
# longer ones are compared each time rather than held in memory.
_CACHED_LENGTH = 8192


@functools.lru_cache(maxsize=1024)
def _cached_compare(sql: str, by_bytes: bool, scs_may_be_off: bool) -> str | None:
    raw = sql.encode("utf-8", "surrogateescape") if by_bytes else None
    return _compare(sql if raw is None else raw.decode("latin-1"), raw, scs_may_be_off)


def _compare(view: str, raw: bytes | None, scs_may_be_off: bool) -> str | None:
    """Compares pgveil's reading (scs on, the bytes as they are) with every reading the server may make:
    None if all agree, else what makes the difference ("scs" or "encoding")."""
    expected = scan(view).reading()
    scs_values = (True, False) if scs_may_be_off else (True,)
    views = [view]
    if raw is not None:
        for pattern in _SEGMENTATIONS:
            other = _segmented(pattern, raw)
            if other != raw:
                views.append(other.decode("latin-1"))
    for v in views:
        for scs in scs_values:
            if v is view and scs:
                continue
            got: Scan = scan(v, standard_conforming_strings=scs)
            if v is not view and got.error is not None:
                continue  # the server cannot convert or scan these bytes and runs none of the text
            if got.reading() != expected:
                return "scs" if v is view else "encoding"
    return None


def _differs(certain: bool, *, encoding: bool) -> FeatureNotSupported:
    if not certain:
        return FeatureNotSupported(
            "pgveil: the statement would read differently if a request still unanswered changes "
            + ("client_encoding" if encoding else "standard_conforming_strings")
            + "; it is refused while tables have encrypted columns",
            hint="wait for the earlier results (Sync) before sending this statement",
            reason=RefusalReason.LEXING,
        )
    return FeatureNotSupported(
        "pgveil: the statement reads differently with standard_conforming_strings off (a backslash in a "
        "string constant, or U&''); it is refused while tables have encrypted columns",
        hint="SET standard_conforming_strings = on, or write backslash escapes as E'...'",
        reason=RefusalReason.LEXING,
    )


def version_refusal(server_major: int) -> ProxyError:
    """The refusal of a text that PostgreSQL ``server_major``'s scanner reads otherwise than pgveil's
    parser (its own scanner stops with a syntax error there): 42601, as the server would answer."""
    server = f"PostgreSQL {server_major}" if server_major else "the server"
    e = ProxyError(
        f"pgveil: the statement uses syntax that {server} does not accept (such as 0x1F, 0o17, 0b101 or "
        "1_000 numbers, or a vertical tab); it is refused because it may name a table with encrypted columns",
        hint="write numbers in plain decimal",
        reason=RefusalReason.LEXING,
    )
    e.sqlstate = "42601"
    return e
