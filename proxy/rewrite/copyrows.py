"""Streaming rewrite of COPY data in text and CSV format: the protected fields of every row, nothing else.

Owns: cutting a COPY data stream (the CopyData payloads of ``COPY ... FROM STDIN`` or ``COPY ... TO
STDOUT``, concatenated; message boundaries fall anywhere) into lines and fields exactly as the
PostgreSQL server does, handing each protected field's value to a per-column transform, and writing the
result back in the same format. Every other byte is copied verbatim. Must not: do I/O, know keys or
ciphers, log or put into an error message any field value (errors name a line number and a column).

Theory of operation
-------------------
The server reads COPY text and CSV in two stages (``copyfromparse.c``), and so do we:

1. Line reading (``CopyReadLineText``). The line terminator is ``\\n``, ``\\r\\n`` or ``\\r``; the first one
   seen fixes the style for the whole stream and any other bare CR or LF is an error ("literal carriage
   return found in data"). In text format a backslash escapes the next byte, even a CR or LF, so an
   escaped newline belongs to the line. In CSV format CR and LF between quotes belong to the line; an
   escape character only counts between quotes. The end-of-data marker ``\\.`` ends the data and the
   server discards what follows it up to CopyDone.
2. Field splitting (``CopyReadAttributesText`` / ``CopyReadAttributesCSV``). The NULL string is
   compared with the raw field (before de-escaping; in CSV only when the field has no quote).

A line is held in ``_buf`` until its terminator is seen; ``_scan`` (and ``_in_quote`` for CSV) remember
how far the current line has been examined, so a row that spans many messages is scanned once. Plain
bytes are skipped with compiled regular expressions (``match`` with possessive repetition) and
``bytes.split``; Python code runs once per line, per special byte that can end a line, and per protected
field, never per byte. Memory is bounded by one line plus one message (``max_line_bytes`` caps a line).

The rewriter raises, before forwarding the line, every error the server would raise while reading the
lines and fields that carry protected data (bad line endings, a wrong number of fields, an unterminated
quote, a protected value that is not valid UTF-8): the server prints the offending line in the error's
CONTEXT, so a line it rejects must never reach it with plaintext in it. An error is final: the COPY has
failed and the session ends it (CopyFail towards the server, ErrorResponse to the client).

Where PostgreSQL versions differ, the rewriter takes the stricter reading:
- text ``\\.`` that is not alone on its line is an error (PostgreSQL 18; 17 and older end the data there);
- CSV ``\\.`` alone on its line ends the data up to PostgreSQL 17 and is a data value from 18 on; the
  caller says which with ``CopyOptions.csv_end_marker``.

Encoding: the stream must be UTF-8 (client_encoding UTF8 and no other COPY ENCODING). The scanning is
byte-wise and safe for UTF-8, whose multi-byte sequences never contain an ASCII byte; encodings such as
SJIS or BIG5 embed ASCII bytes in their characters and would be split wrongly, so the session must
refuse COPY of a protected table under any other client encoding.

The server verifies the raw input bytes in the client encoding before it reads lines and fields
(``CopyConvertBuf``), so a stream with an invalid or incomplete UTF-8 sequence (or a NUL byte) anywhere
is refused even where un-escaping or un-quoting would have made a valid value, unless the sequence lies
after the end-of-data marker (the server never reads that far). The rewriter does the same: each
payload is verified before its bytes are scanned, a sequence split between two CopyData messages waits
for its continuation, and the bytes from the first invalid one on are only looked at if no end marker
came before them (then the stream is refused with 22021, as the server would refuse it).

Docs: PostgreSQL "COPY", sections "File Formats: Text Format" and "CSV Format".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from proxy.errors import ProxyError, RefusalReason

log = logging.getLogger(__name__)

CopyFormat = Literal["text", "csv"]

FieldTransform = Callable[[bytes], bytes | None]
"""Turns one field's value (de-escaped, never NULL) into the new value (to be re-escaped), or None for
NULL (written as the NULL string, unquoted: how the server writes a NULL).

COPY FROM: plaintext in, the ciphertext's bytea text form (``\\x0a1b...``) out (an envelope a ciphertext
role supplies: checked, and out as it came). COPY TO: the bytea text form in, what the role may see in
text form out (the plaintext, a mask, or None for a hidden column). May raise a ``ProxyError``; the
rewriter then stops."""

DEFAULT_MAX_LINE_BYTES = (1 << 30) - 1  # the server's MaxAllocSize bounds its line buffer the same way

_LF = 0x0A
_CR = 0x0D
_BACKSLASH = 0x5C
_DOT = 0x2E
_NO_BYTE = -1  # stands for "end of data" where the server reads its NUL pad byte

# The characters COPY text format may not use as delimiter (ProcessCopyOptions).
_TEXT_FORBIDDEN_DELIMITERS = "\\.abcdefghijklmnopqrstuvwxyz0123456789"


class CopyDataError(ProxyError):
    """COPY data the rewriter cannot accept. ``line`` is the 1-based line of the COPY data (the header
    counts), when the error belongs to one."""

    reason = RefusalReason.VALUE

    def __init__(self, message: str, *, line: int | None = None, hint: str | None = None) -> None:
        where = f"COPY data line {line}: " if line is not None else ""
        super().__init__(where + message, hint=hint)
        self.line = line


class BadCopyFileFormat(CopyDataError):
    """Malformed text or CSV COPY data (the server's own SQLSTATE for the same faults)."""

    sqlstate = "22P04"


class CharacterNotInRepertoire(CopyDataError):
    """A protected field's value is not valid UTF-8 (or holds a NUL), which the server would refuse."""

    sqlstate = "22021"
    reason = RefusalReason.ENCODING


class CopyLineTooLong(CopyDataError):
    """A single COPY line exceeds ``max_line_bytes``."""

    sqlstate = "54000"
    reason = RefusalReason.LIMITS


class InvalidCopyOptions(ProxyError):
    """COPY options that PostgreSQL refuses, or that the rewriter cannot read safely."""

    sqlstate = "22023"
    reason = RefusalReason.CONSTRUCT


@dataclass(frozen=True, slots=True)
class CopyOptions:
    """The COPY statement's options that decide how its data is read and written.

    ``None`` means "not given": ``delimiter`` is tab (text) or comma (CSV), ``null`` is ``\\N`` (text) or
    the empty string (CSV), ``quote`` is ``"`` and ``escape`` is the quote character. ``header`` is true
    for ``HEADER true`` and ``HEADER MATCH`` alike: the first line is passed through untouched.
    ``default`` is PostgreSQL 16's DEFAULT marker (a field equal to it is passed through). ``force_quote``,
    ``force_not_null`` and ``force_null`` are 0-based positions in the COPY column list (CSV only; the
    caller expands ``*``). ``csv_end_marker`` is false for PostgreSQL 18 and later, where ``\\.`` in CSV
    data is a value, not the end of data. The CSV-only options are ignored in text format (the server
    refuses such a statement before any data flows).
    """

    format: CopyFormat = "text"
    delimiter: str | None = None
    null: str | None = None
    quote: str | None = None
    escape: str | None = None
    header: bool = False
    default: str | None = None
    force_quote: frozenset[int] = field(default_factory=frozenset)
    force_not_null: frozenset[int] = field(default_factory=frozenset)
    force_null: frozenset[int] = field(default_factory=frozenset)
    csv_end_marker: bool = True

    def __post_init__(self) -> None:
        # The same checks as the server's ProcessCopyOptions, so the rewriter never reads data under
        # options that the server would read differently or refuse.
        csv = self.format == "csv"
        if self.format not in ("text", "csv"):
            raise InvalidCopyOptions(f"COPY format {self.format!r} cannot be rewritten (text and csv only)")
        delimiter = self.delimiter_char
        _require_single_ascii("delimiter", delimiter)
        if delimiter in "\r\n":
            raise InvalidCopyOptions("COPY delimiter cannot be newline or carriage return")
        null = self.null_string
        if "\r" in null or "\n" in null:
            raise InvalidCopyOptions("COPY null representation cannot use newline or carriage return")
        if not csv and delimiter in _TEXT_FORBIDDEN_DELIMITERS:
            raise InvalidCopyOptions(f"COPY delimiter cannot be {delimiter!r}")
        if delimiter in null:
            raise InvalidCopyOptions("COPY delimiter must not appear in the NULL specification")
        if csv:
            quote, escape = self.quote_char, self.escape_char
            _require_single_ascii("quote", quote)
            _require_single_ascii("escape", escape)
            if quote in "\r\n" or escape in "\r\n":
                raise InvalidCopyOptions("COPY quote and escape cannot be newline or carriage return")
            if delimiter == quote:
                raise InvalidCopyOptions("COPY delimiter and quote must be different")
            if quote in null:
                raise InvalidCopyOptions("CSV quote character must not appear in the NULL specification")
        if self.default is not None:
            if "\r" in self.default or "\n" in self.default:
                raise InvalidCopyOptions("COPY default representation cannot use newline or carriage return")
            if delimiter in self.default:
                raise InvalidCopyOptions("COPY delimiter must not appear in the DEFAULT specification")
            if csv and self.quote_char in self.default:
                raise InvalidCopyOptions("CSV quote character must not appear in the DEFAULT specification")
            if self.default == null:
                raise InvalidCopyOptions("NULL specification and DEFAULT specification cannot be the same")
        for name, positions in (
            ("force_quote", self.force_quote),
            ("force_not_null", self.force_not_null),
            ("force_null", self.force_null),
        ):
            if any(p < 0 for p in positions):
                raise InvalidCopyOptions(f"COPY {name} positions must not be negative")

    @property
    def delimiter_char(self) -> str:
        if self.delimiter is not None:
            return self.delimiter
        return "," if self.format == "csv" else "\t"

    @property
    def null_string(self) -> str:
        if self.null is not None:
            return self.null
        return "" if self.format == "csv" else "\\N"

    @property
    def quote_char(self) -> str:
        return '"' if self.quote is None else self.quote

    @property
    def escape_char(self) -> str:
        return self.quote_char if self.escape is None else self.escape


def _require_single_ascii(name: str, value: str) -> None:
    if len(value) != 1 or not value.isascii():
        raise InvalidCopyOptions(f"COPY {name} must be a single one-byte character")


class _Eol(Enum):
    """The line terminator style, fixed by the first terminator in the stream (as the server does)."""

    UNKNOWN = "unknown"
    NL = "\\n"
    CR = "\\r"
    CRNL = "\\r\\n"


# Text-format escapes the server de-escapes (CopyReadAttributesText); any other escaped byte is itself.
_TEXT_UNESCAPE_LETTERS = {
    ord("b"): b"\b",
    ord("f"): b"\f",
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
    ord("v"): b"\v",
}
_TEXT_UNESCAPE_RE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.)|\Z)", re.S)
# And the ones it writes (CopyAttributeOutText).
_TEXT_ESCAPE_LETTERS = {
    0x08: b"\\b",
    0x09: b"\\t",
    0x0A: b"\\n",
    0x0B: b"\\v",
    0x0C: b"\\f",
    0x0D: b"\\r",
    _BACKSLASH: b"\\\\",
}  # the delimiter, when none of these, is written as a backslash and itself


def _text_unescape_one(m: re.Match[bytes]) -> bytes:
    octal, hexa, other = m.group(1), m.group(2), m.group(3)
    if octal is not None:
        return bytes((int(octal, 8) & 0xFF,))
    if hexa is not None:
        return bytes((int(hexa, 16),))
    if other is None:  # a backslash just before the end of the last line is dropped
        return b""
    return _TEXT_UNESCAPE_LETTERS.get(other[0], other)


def unescape_text_field(raw: bytes) -> bytes:
    """The value of a raw, non-NULL text-format field, de-escaped as the server does."""
    if b"\\" not in raw:
        return raw
    return _TEXT_UNESCAPE_RE.sub(_text_unescape_one, raw)


class _Dialect:
    """``CopyOptions`` compiled to bytes and regular expressions, shared by the rewriter's hot paths."""

    __slots__ = (
        "csv",
        "csv_end_marker",
        "default",
        "delimiter",
        "escape",
        "escape_pairs",
        "escape_re",
        "field_re",
        "force_not_null",
        "force_null",
        "force_quote",
        "header",
        "in_quote_re",
        "line_re",
        "null",
        "quote",
        "quote_special_re",
    )

    def __init__(self, options: CopyOptions) -> None:
        self.csv = options.format == "csv"
        self.header = options.header
        self.delimiter = options.delimiter_char.encode()
        self.null = options.null_string.encode()
        self.default = None if options.default is None else options.default.encode("utf-8")
        self.force_quote = options.force_quote
        self.force_not_null = options.force_not_null
        self.force_null = options.force_null
        self.csv_end_marker = options.csv_end_marker
        d = re.escape(self.delimiter)
        if self.csv:
            self.quote = options.quote_char.encode()
            self.escape = options.escape_char.encode()
            q, e = re.escape(self.quote), re.escape(self.escape)
            # Inside quotes: anything but the quote; an escape character takes the next byte with it
            # (the server's last_was_esc toggle amounts to exactly that pairing).
            if self.quote == self.escape:
                in_quote = rb"[^" + q + rb"]*+"
            else:
                in_quote = rb"(?:[^" + q + e + rb"]++|" + e + rb".)*+"
            self.in_quote_re = re.compile(in_quote, re.S)
            # A line runs to the first CR or LF outside quotes; it stops early at an unclosed quote.
            self.line_re = re.compile(rb"(?:[^" + q + rb"\r\n]++|" + q + in_quote + q + rb")*+", re.S)
            self.field_re = re.compile(rb"(?:[^" + q + d + rb"]++|" + q + in_quote + q + rb")*+", re.S)
            self.quote_special_re = re.compile(rb"[" + d + q + rb"\r\n]")
            self.escape_re = re.compile(b"(?!)")
            self.escape_pairs: tuple[tuple[bytes, bytes], ...] = ()
        else:
            self.quote = self.escape = b""
            # A line runs to the first CR or LF that no backslash escapes, or to "\.".
            self.line_re = re.compile(rb"(?:[^\\\r\n]++|\\[^.])*+", re.S)
            self.field_re = re.compile(rb"(?:[^\\" + d + rb"]++|\\.?)*+", re.S)
            self.in_quote_re = self.quote_special_re = re.compile(b"(?!)")
            delim = self.delimiter[0]
            # Applied after backslashes are doubled, since each of these brings a backslash in.
            escapes = dict(_TEXT_ESCAPE_LETTERS)
            escapes.setdefault(delim, b"\\" + self.delimiter)
            del escapes[_BACKSLASH]
            self.escape_pairs = tuple((bytes((byte,)), escaped) for byte, escaped in escapes.items())
            self.escape_re = re.compile(rb"[\x00\x08-\x0d\\" + d + rb"]")


# The scanner's answers besides a line's (end, next start): wait for more data / the end marker was met.
_NEED_MORE = (-1, -1)


CopySnapshot = tuple[bytes, int, bool, "_Eol", int, int, bool, bytes]


class CopyRowRewriter:
    """Rewrites the protected fields of a COPY text or CSV stream, one complete line at a time.

    ``transforms`` has one entry per column of the COPY column list, in order: a ``FieldTransform`` for a
    protected column, ``None`` for a column whose bytes pass untouched. ``column_names`` (same length)
    only improves error messages. Feed the CopyData payloads to ``feed`` in order and forward what it
    returns (possibly empty) as CopyData; at CopyDone call ``finish`` and forward its result before the
    CopyDone. After CopyFail, or after any error, drop the rewriter.

    The same rewriter serves both directions; only the transform differs. NULL fields (and fields equal
    to the DEFAULT marker) are never passed to a transform and keep their bytes.

    ``row_field`` (per-subject keys) is ``(i, on_row)``: before a line's transforms run, ``on_row`` gets the
    value of its field ``i`` (unescaped or unquoted; None for NULL or DEFAULT), so that the transforms
    seal for that row's data subject. :meth:`snapshot` and :meth:`restore` let a caller retry a payload
    whose transform asked for a key that is not in memory yet (the rewriter is then as before the feed).
    """

    __slots__ = (
        "_buf",
        "_d",
        "_ended",
        "_eol",
        "_failed",
        "_finished",
        "_in_quote",
        "_line_no",
        "_max_line",
        "_names",
        "_ncols",
        "_protected",
        "_row_field",
        "_rows",
        "_scan",
        "_utf8_tail",
    )

    def __init__(
        self,
        options: CopyOptions,
        transforms: Sequence[FieldTransform | None],
        *,
        column_names: Sequence[str] | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        row_field: tuple[int, Callable[[bytes | None], None]] | None = None,
    ) -> None:
        if not transforms:
            raise ValueError("a COPY rewriter needs at least one column")
        if column_names is not None and len(column_names) != len(transforms):
            raise ValueError("column_names and transforms differ in length")
        self._d = _Dialect(options)
        self._ncols = len(transforms)
        self._protected = tuple((i, t) for i, t in enumerate(transforms) if t is not None)
        if row_field is not None and not 0 <= row_field[0] < len(transforms):
            raise ValueError("row_field names no column")
        self._row_field = row_field
        self._names = tuple(column_names) if column_names is not None else None
        self._max_line = max_line_bytes
        self._buf = bytearray()
        self._scan = 0  # where the current line's scan resumes (the line itself starts at 0)
        self._in_quote = False
        self._eol = _Eol.UNKNOWN
        self._line_no = 0
        self._rows = 0
        self._ended = False
        self._finished = False
        self._failed = False
        self._utf8_tail = b""  # the start of a UTF-8 sequence whose continuation is in the next payload

    def __repr__(self) -> str:
        return (
            f"CopyRowRewriter(format={'csv' if self._d.csv else 'text'}, columns={self._ncols}, "
            f"protected={len(self._protected)}, line={self._line_no}, buffered={len(self._buf)})"
        )

    # -- public API -----------------------------------------------------------------------------------
    @property
    def ended(self) -> bool:
        """True once the end-of-data marker has been passed on (later data is dropped, as the server
        drops it) or ``finish`` has run."""
        return self._ended or self._finished

    @property
    def line_number(self) -> int:
        """The line being rewritten (inside a transform) or the last line rewritten; the header counts."""
        return self._line_no

    @property
    def rows(self) -> int:
        """Data rows rewritten so far (the header and the end marker are not rows)."""
        return self._rows

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held back until its end arrives."""
        return len(self._buf)

    def snapshot(self) -> CopySnapshot:
        """The rewriter's state, for :meth:`restore` (holds buffered row bytes: never log it)."""
        return (
            bytes(self._buf), self._scan, self._in_quote, self._eol, self._line_no, self._rows, self._ended,
            self._utf8_tail,
        )  # fmt: skip

    def restore(self, state: CopySnapshot) -> None:
        """Back to a :meth:`snapshot`: the payloads fed since are to be fed again."""
        buf, self._scan, self._in_quote, self._eol, self._line_no, self._rows, self._ended, self._utf8_tail = state
        self._buf = bytearray(buf)
        self._failed = False

    def feed(self, data: bytes) -> bytes:
        """Takes the next CopyData payload; returns the rewritten bytes of every line it completed."""
        if self._finished or self._failed:
            raise RuntimeError("feed() after finish() or after an error")
        if self._ended:
            return b""
        if self._utf8_tail:
            data = self._utf8_tail + data
            self._utf8_tail = b""
        valid, invalid = _utf8_prefix(data)
        out: list[bytes | bytearray] = []
        if invalid == len(data):
            self._buf += data
            self._drain(out, final=False)
            return b"".join(out)
        self._buf += data[:valid]
        self._drain(out, final=False)
        if self._ended:
            return b"".join(out)  # the bad bytes lie after the end marker: the server never reads them
        if invalid < 0:  # a sequence cut short at the end of this payload: its end is in the next one
            self._utf8_tail = data[valid:]
            return b"".join(out)
        self._failed = True
        raise self._invalid_encoding()

    def _invalid_encoding(self) -> CharacterNotInRepertoire:
        # PostgreSQL quotes the offending bytes; they may be plaintext, so the rewriter never does.
        return CharacterNotInRepertoire(
            'invalid byte sequence for encoding "UTF8" (or a NUL byte) in the COPY data', line=self._line_no + 1
        )

    def finish(self) -> bytes:
        """At CopyDone: the rewritten last line if it had no terminator, else ``b""``.

        Raises ``BadCopyFileFormat`` where the server would fail at end of data (an unterminated CSV quoted
        field, a broken end marker)."""
        if self._failed:
            raise RuntimeError("finish() after an error")
        if self._finished:
            return b""
        self._finished = True
        if self._ended:
            self._buf.clear()
            return b""
        if self._utf8_tail:  # CopyDone with a multibyte character cut short: the server refuses it
            self._failed = True
            raise self._invalid_encoding()
        out: list[bytes | bytearray] = []
        self._drain(out, final=True)
        self._buf.clear()
        return b"".join(out)

    # -- line reading -----------------------------------------------------------------------------------
    def _drain(self, out: list[bytes | bytearray], *, final: bool) -> None:
        buf = self._buf
        d = self._d
        start = 0
        try:
            while True:
                n = len(buf)
                if start == n and not final:
                    break
                end, nxt = self._scan_csv(start, final) if d.csv else self._scan_text(start, final)
                if end < 0:  # need more data, or the end marker was passed on
                    if self._ended:
                        out.append(buf[start:nxt])
                        start = n
                    break
                if end == start == nxt:  # end of data right at a line boundary: no row
                    break
                if end - start > self._max_line:
                    raise CopyLineTooLong("line too long", line=self._line_no + 1)
                self._line_no += 1
                if self._line_no == 1 and d.header:
                    out.append(buf[start:nxt])
                else:
                    line = bytes(buf[start:end])
                    out.append(self._rewrite_csv_line(line) if d.csv else self._rewrite_text_line(line))
                    out.append(buf[end:nxt])
                    self._rows += 1
                start = nxt
                self._scan = start
                self._in_quote = False
        except BaseException:
            # A failed line (bad data, or a transform that raised) leaves no way to resynchronise:
            # the rewriter refuses any further input rather than guess where the next row starts.
            self._failed = True
            raise
        finally:
            if start:
                del buf[:start]
                self._scan -= start
        if self._ended:
            buf.clear()
        elif len(buf) > self._max_line:
            raise CopyLineTooLong("line too long", line=self._line_no + 1)

    def _scan_text(self, start: int, final: bool) -> tuple[int, int]:
        """Finds the end of the text-format line starting at ``start`` (CopyReadLineText)."""
        buf = self._buf
        n = len(buf)
        e = _match_end(self._d.line_re, buf, self._scan)
        if e >= n:
            if final:
                return n, n
            self._scan = e
            return _NEED_MORE
        c = buf[e]
        if c == _BACKSLASH:
            if e + 1 >= n:
                if final:  # a backslash just before the end of data is data
                    return n, n
                self._scan = e
                return _NEED_MORE
            # buf[e + 1] is "."
            marker = self._end_marker(start, final, csv=False) if e == start else None
            if marker is None:
                if e + 2 >= n and not final:
                    # The server reads the byte after the "." before it decides; if that byte is not valid
                    # UTF-8, its encoding error comes first (feed raises it once this returns).
                    self._scan = e
                    return _NEED_MORE
                raise BadCopyFileFormat("end-of-copy marker is not alone on its line", line=self._line_no + 1)
            return marker
        return self._terminator(e, final)

    def _scan_csv(self, start: int, final: bool) -> tuple[int, int]:
        """Finds the end of the CSV line starting at ``start``: CR and LF count outside quotes only."""
        d = self._d
        buf = self._buf
        n = len(buf)
        pos = self._scan
        if pos == start and d.csv_end_marker and start < n and buf[start] == _BACKSLASH:
            marker = self._end_marker(start, final, csv=True)
            if marker is not None:
                return marker
        while True:
            if self._in_quote:
                e = _match_end(d.in_quote_re, buf, pos)
                if e >= n or buf[e] != d.quote[0]:  # the closing quote has not arrived yet
                    if final:  # the field parser reports the unterminated quote
                        return n, n
                    self._scan = e
                    return _NEED_MORE
                self._in_quote = False
                pos = e + 1
            e = _match_end(d.line_re, buf, pos)
            if e >= n:
                if final:
                    return n, n
                self._scan = e
                return _NEED_MORE
            if buf[e] == d.quote[0]:
                self._in_quote = True
                pos = e + 1
                continue
            return self._terminator(e, final)

    def _terminator(self, e: int, final: bool) -> tuple[int, int]:
        """The CR or LF at ``e`` ends the line; checks it against the stream's style."""
        buf = self._buf
        if buf[e] == _LF:
            if self._eol is _Eol.CR or self._eol is _Eol.CRNL:
                raise self._stray("newline", "\\n")
            self._eol = _Eol.NL
            return e, e + 1
        if self._eol is _Eol.NL:
            raise self._stray("carriage return", "\\r")
        if self._eol is _Eol.CR:
            return e, e + 1
        if e + 1 >= len(buf):
            if not final:
                self._scan = e
                return _NEED_MORE
            after = _NO_BYTE
        else:
            after = buf[e + 1]
        if after == _LF:
            self._eol = _Eol.CRNL
            return e, e + 2
        if self._eol is _Eol.CRNL:
            raise self._stray("carriage return", "\\r")
        self._eol = _Eol.CR
        return e, e + 1

    def _stray(self, what: str, escape: str) -> BadCopyFileFormat:
        line = self._line_no + 1
        if self._d.csv:
            return BadCopyFileFormat(
                f"unquoted {what} found in data", line=line, hint=f"Use quoted CSV field to represent {what}."
            )
        return BadCopyFileFormat(
            f"literal {what} found in data", line=line, hint=f'Use "{escape}" to represent {what}.'
        )

    def _end_marker(self, start: int, final: bool, *, csv: bool) -> tuple[int, int] | None:
        """Checks ``\\.`` at ``start`` as the server does; on a marker, records the end of data and returns
        ``(-1, end of marker)``. Returns ``_NEED_MORE`` to wait for bytes, and (CSV only) ``None`` when it is
        data after all."""
        buf = self._buf
        n = len(buf)
        line = self._line_no + 1
        if start + 1 >= n:
            if final:  # a lone backslash at the end of data is data
                return None
            self._scan = start
            return _NEED_MORE
        if buf[start + 1] != _DOT:
            return None
        p = start + 2
        if self._eol is _Eol.CRNL:
            if p >= n and not final:
                self._scan = start
                return _NEED_MORE
            c2 = buf[p] if p < n else _NO_BYTE
            p += 1
            if c2 == _LF:
                if csv:
                    return None
                raise BadCopyFileFormat("end-of-copy marker does not match previous newline style", line=line)
            if c2 != _CR:
                if csv:
                    return None
                raise BadCopyFileFormat("end-of-copy marker is not alone on its line", line=line)
        if p >= n and not final:
            self._scan = start
            return _NEED_MORE
        c2 = buf[p] if p < n else _NO_BYTE
        p += 1
        if c2 != _CR and c2 != _LF:
            if csv:
                return None
            raise BadCopyFileFormat("end-of-copy marker is not alone on its line", line=line)
        eol = self._eol
        if (eol is _Eol.NL and c2 != _LF) or (eol is _Eol.CRNL and c2 != _LF) or (eol is _Eol.CR and c2 != _CR):
            raise BadCopyFileFormat("end-of-copy marker does not match previous newline style", line=line)
        self._ended = True
        log.debug("COPY end-of-data marker after %d rows", self._rows)
        return -1, p

    # -- fields ---------------------------------------------------------------------------------------
    def _rewrite_text_line(self, line: bytes) -> bytes:
        d = self._d
        fields = self._split_text(line) if b"\\" in line else line.split(d.delimiter)
        if len(fields) != self._ncols:
            self._wrong_field_count(len(fields))
        null, default = d.null, d.default
        if self._row_field is not None:
            raw = fields[self._row_field[0]]
            self._row_field[1](None if raw in (null, default) else unescape_text_field(raw) if b"\\" in raw else raw)
        for i, transform in self._protected:
            raw = fields[i]
            if raw in (null, default):
                continue
            # Only the last field of the last line can end in an unpaired backslash; the server leaves it
            # out when it compares the field with the NULL and DEFAULT strings.
            if raw[-1:] == b"\\" and _odd_backslash_tail(raw) and raw[:-1] in (null, default):
                continue
            value = unescape_text_field(raw) if b"\\" in raw else raw
            if not value.isascii() or b"\x00" in value:
                self._check_value(value, i)
            new = transform(value)
            if new is None:
                fields[i] = null
                continue
            if d.escape_re.search(new) is not None:
                if b"\x00" in new:
                    raise self._nul_output(i)
                if b"\\" in new:
                    new = new.replace(b"\\", b"\\\\")
                for special, escaped in d.escape_pairs:
                    if special in new:
                        new = new.replace(special, escaped)
            if new in (null, default):
                # A value that reads like the NULL (or DEFAULT) string would come back as NULL; an
                # octal escape of its first byte keeps the value and breaks the likeness (the server's
                # own COPY TO does not guard against this).
                new = b"\\%03o" % new[0] + new[1:]
            fields[i] = new
        return d.delimiter.join(fields)

    def _rewrite_csv_line(self, line: bytes) -> bytes:
        d = self._d
        fields = self._split_csv(line) if d.quote in line else line.split(d.delimiter)
        if len(fields) != self._ncols:
            self._wrong_field_count(len(fields))
        null, default = d.null, d.default
        if self._row_field is not None:
            raw = fields[self._row_field[0]]
            if d.quote in raw:
                self._row_field[1](self._csv_value(raw))
            else:
                self._row_field[1](None if raw in (null, default) else raw)
        for i, transform in self._protected:
            raw = fields[i]
            if d.quote in raw:
                value = self._csv_value(raw)
                if i in d.force_null and value == null:
                    continue  # FORCE_NULL: a quoted NULL string is NULL; its bytes say so to the server too
            elif raw == null:
                if i not in d.force_not_null:
                    continue
                value = null  # FORCE_NOT_NULL: the NULL string becomes the value
            else:
                value = raw
            if raw == default:
                continue
            if not value.isascii() or b"\x00" in value:
                self._check_value(value, i)
            new = transform(value)
            if new is None:
                fields[i] = null
                continue
            if d.quote_special_re.search(new) is not None or new in (null, default, b"\\.") or i in d.force_quote:
                q, e = d.quote, d.escape
                if e != q and e in new:
                    new = new.replace(e, e + e)
                new = q + new.replace(q, e + q) + q
            if b"\x00" in new:
                raise self._nul_output(i)
            fields[i] = new
        return d.delimiter.join(fields)

    def _wrong_field_count(self, found: int) -> None:
        line = self._line_no
        if found > self._ncols:
            raise BadCopyFileFormat("extra data after last expected column", line=line)
        column = f'"{self._names[found]}"' if self._names is not None else f"number {found + 1}"
        raise BadCopyFileFormat(f"missing data for column {column}", line=line)

    def _split_text(self, line: bytes) -> list[bytes]:
        fields: list[bytes] = []
        field_re = self._d.field_re
        n = len(line)
        pos = 0
        while True:
            e = _match_end(field_re, line, pos)
            fields.append(line[pos:e])
            if e >= n:
                return fields
            pos = e + 1  # line[e] is the delimiter

    def _split_csv(self, line: bytes) -> list[bytes]:
        fields: list[bytes] = []
        field_re = self._d.field_re
        delimiter = self._d.delimiter[0]
        n = len(line)
        pos = 0
        while True:
            e = _match_end(field_re, line, pos)
            if e < n and line[e] != delimiter:  # an opening quote that no quote closes
                raise BadCopyFileFormat("unterminated CSV quoted field", line=self._line_no)
            fields.append(line[pos:e])
            if e >= n:
                return fields
            pos = e + 1

    def _csv_value(self, raw: bytes) -> bytes:
        """The value of a raw CSV field that contains a quote (CopyReadAttributesCSV)."""
        d = self._d
        q, e = d.quote[0], d.escape[0]
        out = bytearray()
        n = len(raw)
        i = 0
        while i < n:
            k = raw.find(d.quote, i)
            if k < 0:
                out += raw[i:]
                break
            out += raw[i:k]
            i = k + 1
            while True:  # inside quotes, up to the quote that closes them
                k = _match_end(d.in_quote_re, raw, i)
                if k >= n or raw[k] != q:
                    raise BadCopyFileFormat("unterminated CSV quoted field", line=self._line_no)
                if q == e:
                    out += raw[i:k]
                    if k + 1 < n and raw[k + 1] == q:  # a doubled quote is one quote
                        out.append(q)
                        i = k + 2
                        continue
                else:
                    out += _unpair_escapes(raw[i:k], e, q)
                i = k + 1
                break
        return bytes(out)

    def _check_value(self, value: bytes, i: int) -> None:
        # The server verifies every field it reads as UTF-8 without NUL bytes (CopyConvertBuf,
        # pg_verifymbstr); with ciphertext in the field it no longer can, so we do.
        if value.isascii():
            if b"\x00" not in value:
                return
        else:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:
                if b"\x00" not in value:
                    return
        raise CharacterNotInRepertoire(
            f"invalid byte sequence for encoding UTF8 in column {self._column(i)}", line=self._line_no
        )

    def _nul_output(self, i: int) -> CharacterNotInRepertoire:
        # neither text nor CSV COPY can carry a NUL byte
        return CharacterNotInRepertoire(
            f"rewritten value of column {self._column(i)} contains a NUL byte", line=self._line_no
        )

    def _column(self, i: int) -> str:
        return f'"{self._names[i]}"' if self._names is not None else f"number {i + 1}"


def _utf8_prefix(data: bytes) -> tuple[int, int]:
    """How much of ``data`` verifies as the server verifies client input (``pg_encoding_verifymbstr``):
    valid UTF-8 without NUL. Returns ``(valid, len(data))`` when all of it does, ``(valid, valid)`` when
    the bytes at ``valid`` are invalid, and ``(valid, -1)`` when they are the start of a sequence that
    ``data`` cuts short (it may be completed by the next payload)."""
    n = len(data)
    nul = data.find(b"\x00")
    if data.isascii():
        return (n, n) if nul < 0 else (nul, nul)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.start
        if nul >= 0 and nul < bad:
            return nul, nul
        if e.reason == "unexpected end of data" and n - bad < 4:
            return bad, -1
        return bad, bad
    return (n, n) if nul < 0 else (nul, nul)


def _odd_backslash_tail(raw: bytes) -> bool:
    return (len(raw) - len(raw.rstrip(b"\\"))) % 2 == 1


def _match_end(pattern: re.Pattern[bytes], data: bytes | bytearray, pos: int) -> int:
    m = pattern.match(data, pos)
    assert m is not None  # every scanning pattern also matches the empty string
    return m.end()


def _unpair_escapes(chunk: bytes, escape: int, quote: int) -> bytes:
    """De-escapes a run inside CSV quotes whose escape character differs from the quote.

    The run holds whole pairs only (``in_quote_re`` consumes an escape with the byte after it): escape
    followed by escape or quote stands for that byte, escape followed by anything else for both bytes."""
    if escape not in chunk:
        return chunk
    out = bytearray()
    n = len(chunk)
    i = 0
    while i < n:
        k = chunk.find(escape, i)
        if k < 0 or k + 1 >= n:
            out += chunk[i:]
            break
        out += chunk[i:k]
        nxt = chunk[k + 1]
        if nxt != escape and nxt != quote:
            out.append(escape)
        out.append(nxt)
        i = k + 2
    return bytes(out)
