"""CopyRowRewriter: COPY text and CSV rows are cut and de-escaped exactly as the server does it, protected
fields are re-escaped, every other byte is kept, and any split of the stream gives the same bytes.

``Oracle`` below is a byte-by-byte transcription of the server's CopyReadLineText and
CopyReadAttributesText/CSV (PostgreSQL 18 rules for a text ``\\.``, see the module docstring); the
property tests hold the fast rewriter to it."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.rewrite.copyrows import (
    BadCopyFileFormat,
    CharacterNotInRepertoire,
    CopyDataError,
    CopyLineTooLong,
    CopyOptions,
    CopyRowRewriter,
    FieldTransform,
    InvalidCopyOptions,
    unescape_text_field,
)

TEXT = CopyOptions()
CSV = CopyOptions(format="csv")


def upper(value: bytes) -> bytes:
    return value.decode("utf-8").upper().encode("utf-8")


def mark(value: bytes) -> bytes:
    """Moves special bytes around and adds some, so re-escaping is exercised; never yields NUL."""
    return b"[" + value[::-1] + b"]"


def rewrite(options: CopyOptions, transforms: Sequence[FieldTransform | None], chunks: Sequence[bytes]) -> bytes:
    rw = CopyRowRewriter(options, transforms)
    out = b"".join(rw.feed(c) for c in chunks)
    return out + rw.finish()


def constant(value: bytes) -> FieldTransform:
    return lambda _: value


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- the oracle: the server's algorithm, one byte at a time ---------------------------------------------
LF, CR, BS, DOT = 0x0A, 0x0D, 0x5C, 0x2E


class OracleError(Exception):
    def __init__(self, kind: type[CopyDataError], line: int) -> None:
        super().__init__(kind.__name__, line)
        self.kind = kind
        self.line = line


@dataclass
class Field:
    raw: bytes
    value: bytes | None  # None: NULL
    passthrough: bool  # NULL or the DEFAULT marker: the rewriter keeps the raw bytes


@dataclass
class Parsed:
    header: bytes | None
    rows: list[list[Field]]
    terminators: list[bytes]
    marker: bytes | None  # the end-of-data marker as it appeared, with its line terminator


def first_invalid_utf8(data: bytes) -> int:
    """Where verification of raw client input in UTF-8 stops: an invalid or incomplete sequence, or NUL."""
    n, i = len(data), 0
    while i < n:
        if data[i] == 0:
            return i
        if data[i] < 0x80:
            i += 1
            continue
        for k in (2, 3, 4):  # one character of k bytes
            try:
                data[i : i + k].decode("utf-8")
            except UnicodeDecodeError:
                continue
            if i + k <= n:
                i += k
                break
        else:
            return i
    return n


class Oracle:
    def __init__(self, options: CopyOptions, ncols: int, protected: Sequence[int]) -> None:
        self.o = options
        self.csv = options.format == "csv"
        self.delim = options.delimiter_char.encode()[0]
        self.null = options.null_string.encode()
        self.quote = options.quote_char.encode()[0] if self.csv else -1
        self.escape = options.escape_char.encode()[0] if self.csv else -1
        self.default = options.default.encode() if options.default is not None else None
        self.ncols = ncols
        self.protected = protected

    def parse(self, data: bytes, *, verify: bool = True) -> Parsed:
        # CopyConvertBuf: the line reader only ever sees the verified prefix of the raw input; needing a
        # byte beyond it (no end marker came first) is the encoding error. (``verify`` False: reading the
        # rewriter's output, whose test transform reverses bytes of multibyte characters.)
        verified = first_invalid_utf8(data) if verify else len(data)
        self.truncated = verified < len(data)
        self.data = data[:verified]
        self.pos = 0
        self.eol = "unknown"
        result = Parsed(None, [], [], None)
        line_no = 0
        while True:
            line_no += 1
            start = self.pos
            line, term, eof, marker = self.read_line(line_no)
            if marker:
                result.marker = data[start : self.pos][len(line) :]
            if line_no == 1 and self.o.header:
                result.header = line + term
                if eof:
                    return result
                continue
            if eof and not line:
                return result
            result.rows.append(self.fields(line, line_no))
            result.terminators.append(term)
            if eof:
                return result

    def peek(self, i: int) -> int:
        if i >= len(self.data):
            self.end_of_verified()
        return self.data[i] if i < len(self.data) else 0  # the server's NUL pad byte at the end of data

    def end_of_verified(self) -> None:
        if self.truncated:
            raise OracleError(CharacterNotInRepertoire, self.line_no)

    def read_line(self, line_no: int) -> tuple[bytes, bytes, bool, bool]:
        """CopyReadLineText: (line, terminator, hit end of data, saw the end marker)."""
        self.line_no = line_no
        data, n, start = self.data, len(self.data), self.pos
        i = start
        first = True
        in_quote = last_was_esc = False
        escapec = self.escape if self.escape != self.quote else -1
        while True:
            if i >= n:
                self.end_of_verified()
                self.pos = n
                return data[start:n], b"", True, False
            prev = i
            c = data[i]
            i += 1
            if self.csv:
                if in_quote and c == escapec:
                    last_was_esc = not last_was_esc
                if c == self.quote and not last_was_esc:
                    in_quote = not in_quote
                if c != escapec:
                    last_was_esc = False
            if c == CR and not (self.csv and in_quote):
                if self.eol in ("unknown", "crnl"):
                    if self.peek(i) == LF:
                        i += 1
                        self.eol = "crnl"
                    elif self.eol == "crnl":
                        raise OracleError(BadCopyFileFormat, line_no)
                    else:
                        self.eol = "cr"
                elif self.eol == "nl":
                    raise OracleError(BadCopyFileFormat, line_no)
                self.pos = i
                return data[start:prev], data[prev:i], False, False
            if c == LF and not (self.csv and in_quote):
                if self.eol in ("cr", "crnl"):
                    raise OracleError(BadCopyFileFormat, line_no)
                self.eol = "nl"
                self.pos = i
                return data[start:prev], data[prev:i], False, False
            if c == BS and (not self.csv or (first and self.o.csv_end_marker)):
                if i >= n:  # a backslash just before the end of data is data
                    self.end_of_verified()
                    self.pos = n
                    return data[start:n], b"", True, False
                if data[i] == DOT:
                    i += 1
                    not_marker = False
                    if self.eol == "crnl":
                        c2 = self.peek(i)
                        i += 1
                        if c2 != CR:
                            not_marker = True
                    if not not_marker:
                        c2 = self.peek(i)
                        i += 1
                        if c2 not in (CR, LF):
                            not_marker = True
                        elif (self.eol in ("nl", "crnl") and c2 != LF) or (self.eol == "cr" and c2 != CR):
                            raise OracleError(BadCopyFileFormat, line_no)
                    if not_marker:
                        if not self.csv:
                            raise OracleError(BadCopyFileFormat, line_no)
                        i = prev + 1
                    else:
                        if prev > start:  # PostgreSQL 18: the marker must be alone on its line
                            raise OracleError(BadCopyFileFormat, line_no)
                        self.pos = min(i, n)
                        return b"", b"", True, True
                elif not self.csv:
                    i += 1
            first = False

    def fields(self, line: bytes, line_no: int) -> list[Field]:
        raw_fields = self.split_csv(line, line_no) if self.csv else self.split_text(line)
        if len(raw_fields) > self.ncols:
            raise OracleError(BadCopyFileFormat, line_no)
        if len(raw_fields) < self.ncols:
            raise OracleError(BadCopyFileFormat, line_no)
        out: list[Field] = []
        for i, (raw, cmp_raw, value, saw_quote) in enumerate(raw_fields):
            is_null = not saw_quote and cmp_raw == self.null
            if self.csv and is_null and i in self.o.force_not_null:
                is_null, value = False, self.null
            elif self.csv and not is_null and i in self.o.force_null and value == self.null:
                is_null = True
            if is_null:
                out.append(Field(raw, None, True))
            elif self.default is not None and cmp_raw == self.default:
                out.append(Field(raw, value, True))
            else:
                if i in self.protected:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError:
                        raise OracleError(CharacterNotInRepertoire, line_no) from None
                    if b"\x00" in value:
                        raise OracleError(CharacterNotInRepertoire, line_no)
                out.append(Field(raw, value, False))
        return out

    def split_text(self, line: bytes) -> list[tuple[bytes, bytes, bytes, bool]]:
        """CopyReadAttributesText: (raw, raw as compared with NULL, value, saw_quote)."""
        fields = []
        n = len(line)
        i = 0
        while True:
            start = end = i
            out = bytearray()
            found_delim = False
            while True:
                end = i
                if i >= n:
                    break
                c = line[i]
                i += 1
                if c == self.delim:
                    found_delim = True
                    break
                if c == BS:
                    if i >= n:
                        break
                    c = line[i]
                    i += 1
                    if 0x30 <= c <= 0x37:
                        val = c - 0x30
                        for _ in range(2):
                            if i < n and 0x30 <= line[i] <= 0x37:
                                val = (val << 3) + line[i] - 0x30
                                i += 1
                            else:
                                break
                        c = val & 0xFF
                    elif c == ord("x"):
                        if i < n and chr(line[i]) in "0123456789abcdefABCDEF":
                            val = int(chr(line[i]), 16)
                            i += 1
                            if i < n and chr(line[i]) in "0123456789abcdefABCDEF":
                                val = (val << 4) + int(chr(line[i]), 16)
                                i += 1
                            c = val
                    else:
                        c = {ord("b"): 8, ord("f"): 12, ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("v"): 11}.get(c, c)
                out.append(c)
            raw = line[start : i - 1] if found_delim else line[start:i]
            fields.append((raw, line[start:end], bytes(out), False))
            if not found_delim:
                return fields

    def split_csv(self, line: bytes, line_no: int) -> list[tuple[bytes, bytes, bytes, bool]]:
        """CopyReadAttributesCSV."""
        fields = []
        n = len(line)
        q, e = self.quote, self.escape
        i = 0
        while True:
            start = end = i
            out = bytearray()
            saw_quote = found_delim = False
            done = False
            while not done:
                while True:
                    end = i
                    if i >= n:
                        done = True
                        break
                    c = line[i]
                    i += 1
                    if c == self.delim:
                        found_delim = done = True
                        break
                    if c == q:
                        saw_quote = True
                        break
                    out.append(c)
                if done:
                    break
                while True:
                    end = i
                    if i >= n:
                        raise OracleError(BadCopyFileFormat, line_no)
                    c = line[i]
                    i += 1
                    if c == e and i < n and line[i] in (e, q):
                        out.append(line[i])
                        i += 1
                        continue
                    if c == q:
                        break
                    out.append(c)
            raw = line[start:end]
            fields.append((raw, raw, bytes(out), saw_quote))
            if not found_delim:
                return fields


def check_against_oracle(
    options: CopyOptions, protected: Sequence[int], ncols: int, data: bytes, cuts: Sequence[int]
) -> None:
    """The rewriter fails where the oracle fails (same error, same line), else its output parses to the
    input with the transform applied to the protected fields and every other field's bytes unchanged."""
    transforms = [mark if i in protected else None for i in range(ncols)]
    oracle = Oracle(options, ncols, protected)
    try:
        expected = oracle.parse(data)
    except OracleError as e:
        failure: OracleError | None = e
    else:
        failure = None
    if failure is not None:
        with pytest.raises(CopyDataError) as info:
            rewrite(options, transforms, split_at(data, cuts))
        assert (type(info.value), info.value.line) == (failure.kind, failure.line)
        return
    out = rewrite(options, transforms, split_at(data, cuts))
    assert out == rewrite(options, transforms, [data])
    got = Oracle(options, ncols, ()).parse(out, verify=False)
    assert got.header == expected.header
    assert got.marker == expected.marker
    if expected.marker is not None:
        assert out.endswith(expected.marker)
    assert got.terminators == expected.terminators
    assert len(got.rows) == len(expected.rows)
    for got_row, exp_row in zip(got.rows, expected.rows, strict=True):
        for i, (g, x) in enumerate(zip(got_row, exp_row, strict=True)):
            if i not in protected or x.passthrough:
                assert g.raw == x.raw
            else:
                assert x.value is not None
                assert (g.value, g.passthrough) == (mark(x.value), False)


# -- examples ---------------------------------------------------------------------------------------------
def test_text_rows_have_protected_fields_rewritten_and_others_copied_verbatim() -> None:
    data = b"1\tann\t\\x41\\101x\n2\tbob\t\\N\n"
    assert rewrite(TEXT, [None, None, upper], [data]) == b"1\tann\tAAX\n2\tbob\t\\N\n"
    # Unprotected fields keep their original escapes, even ones a re-escape would spell differently.
    assert rewrite(TEXT, [None, upper, None], [data]) == b"1\tANN\t\\x41\\101x\n2\tBOB\t\\N\n"


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"a\\tb", b"a\tb"),
        (b"\\b\\f\\n\\r\\t\\v", b"\b\f\n\r\t\v"),
        (b"\\\\", b"\\"),
        (b"\\101\\0411\\7", b"A!1\x07"),
        (b"\\777", b"\xff"),
        (b"\\x41\\x4a\\x4G\\xg", b"AJ\x04Gxg"),
        (b"\\q\\.\\ \\N", b"q. N"),
        (b"\\\n\\\r", b"\n\r"),
        (b"trailing\\", b"trailing"),
    ],
)
def test_text_unescape_follows_the_server(raw: bytes, value: bytes) -> None:
    assert unescape_text_field(raw) == value


def test_text_reescapes_what_the_transform_returns() -> None:
    def weird(_: bytes) -> bytes:
        return b"tab\there\nnl\rcr\\bs\x08\x0c\x0b\x01end"

    out = rewrite(TEXT, [weird, None], [b"x\ty\n"])
    assert out == b"tab\\there\\nnl\\rcr\\\\bs\\b\\f\\v\x01end\ty\n"
    # A delimiter that is not a control character is escaped with a backslash.
    out = rewrite(CopyOptions(delimiter="|"), [lambda _: b"a|b\tc", None], [b"x|y\n"])
    assert out == b"a\\|b\\tc|y\n"


def test_text_bytea_ciphertext_gets_its_backslash_doubled_and_back() -> None:
    to_bytea: FieldTransform = lambda v: b"\\x" + v.hex().encode()  # noqa: E731
    out = rewrite(TEXT, [None, to_bytea], [b"1\tsecret\n"])
    assert out == b"1\t\\\\x736563726574\n"
    from_bytea: FieldTransform = lambda v: bytes.fromhex(v[2:].decode())  # noqa: E731
    assert rewrite(TEXT, [None, from_bytea], [out]) == b"1\tsecret\n"


def test_text_null_is_matched_on_the_raw_field() -> None:
    seen: list[bytes] = []

    def spy(value: bytes) -> bytes:
        seen.append(value)
        return value

    opts = CopyOptions(null="NULL")
    out = rewrite(opts, [spy], [b"NULL\n\\NULL\nN\\ULL\n\\N\n"])
    # The escaped forms are values that spell NULL; written back they must not read as NULL.
    assert out == b"NULL\n\\116ULL\n\\116ULL\nN\n"
    assert seen == [b"NULL", b"NULL", b"N"]
    assert unescape_text_field(b"\\116ULL") == b"NULL"
    seen.clear()
    assert rewrite(TEXT, [spy], [b"\\N\n\n"]) == b"\\N\n\n"
    assert seen == [b""]


def test_csv_quoting_embedded_delimiters_newlines_and_doubled_quotes() -> None:
    data = b'1,"a,b ""q""\nline2",plain,"",\n'
    out = rewrite(CSV, [None, upper, upper, upper, upper], [data])
    # the quoted empty string is a value; the unquoted empty field is NULL and stays so
    assert out == b'1,"A,B ""Q""\nLINE2",PLAIN,"",\n'
    assert rewrite(CSV, [None, None, None, None, None], [data]) == data


def test_csv_output_quoting_follows_the_server_rule() -> None:
    cases = {
        b"plain": b"plain",
        b"": b'""',  # equals the NULL string
        b"a,b": b'"a,b"',
        b'say "hi"': b'"say ""hi"""',
        b"cr\rlf\n": b'"cr\rlf\n"',
        b"\\.": b'"\\."',  # would read as the end-of-data marker on a line by itself
        b" padded ": b" padded ",
        b"back\\slash": b"back\\slash",
    }
    for value, quoted in cases.items():
        assert rewrite(CSV, [constant(value)], [b"x\n"]) == quoted + b"\n"
    opts = CopyOptions(format="csv", null="NULL", force_quote=frozenset({0}))
    assert rewrite(opts, [lambda _: b"NULL", lambda _: b"x"], [b"a,b\n"]) == b'"NULL",x\n'


def test_csv_custom_quote_escape_delimiter() -> None:
    opts = CopyOptions(format="csv", delimiter=";", quote="'", escape="\\")
    data = b"'it\\'s;\\\\here''x';'\\q'\n"
    # value 0: it's;\here  then a second quoted part x (the server joins "'...''x'" as two quoted runs)
    seen: list[bytes] = []

    def spy(value: bytes) -> bytes:
        seen.append(value)
        return value

    out = rewrite(opts, [spy, spy], [data])
    assert seen == [b"it's;\\herex", b"\\q"]
    assert out == b"'it\\'s;\\\\herex';\\q\n"


def test_csv_force_not_null_and_force_null() -> None:
    seen: list[bytes] = []

    def spy(value: bytes) -> bytes:
        seen.append(value)
        return b"<" + value + b">"

    opts = CopyOptions(format="csv", force_not_null=frozenset({0}), force_null=frozenset({1}))
    out = rewrite(opts, [spy, spy], [b',""\n"",x\n'])
    # col 0: unquoted empty is not NULL under FORCE_NOT_NULL; col 1: quoted empty is NULL under FORCE_NULL
    assert out == b'<>,""\n<>,<x>\n'
    assert seen == [b"", b"", b"x"]


def test_default_marker_passes_untouched() -> None:
    opts = CopyOptions(format="csv", default="\\D")
    assert rewrite(opts, [upper, upper], [b"\\D,a\n"]) == b"\\D,A\n"
    opts = CopyOptions(default="@default")
    assert rewrite(opts, [upper, upper], [b"@default\tb\n"]) == b"@default\tB\n"


def test_header_line_passes_through() -> None:
    data = b'id,"na\nme"\n1,bob\n'
    assert rewrite(CopyOptions(format="csv", header=True), [None, upper], [data]) == b'id,"na\nme"\n1,BOB\n'
    assert rewrite(CopyOptions(header=True), [upper, upper], [b"a\tb\nc\td\n"]) == b"a\tb\nC\tD\n"


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings_are_kept(eol: bytes) -> None:
    data = b"a\tb" + eol + b"c\td" + eol + b"e\tf"
    assert rewrite(TEXT, [None, upper], [data]) == b"a\tB" + eol + b"c\tD" + eol + b"e\tF"


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_end_marker_passes_and_the_rest_is_dropped(eol: bytes) -> None:
    for opts in (TEXT, CSV):
        rw = CopyRowRewriter(opts, [upper])
        out = rw.feed(b"a" + eol + b"\\." + eol + b"secret" + eol)
        assert out == b"A" + eol + b"\\." + eol
        assert rw.ended
        assert rw.feed(b"more secret\n") == b""
        assert rw.finish() == b""
        assert rw.rows == 1


def test_csv_end_marker_is_data_when_not_alone_or_on_postgresql_18() -> None:
    assert rewrite(CSV, [upper], [b"\\.x\n\\.\n"]) == b"\\.X\n\\.\n"
    pg18 = CopyOptions(format="csv", csv_end_marker=False)
    assert rewrite(pg18, [upper], [b"a\n\\.\nb\n"]) == b'A\n"\\."\nB\n'


@pytest.mark.parametrize(
    ("options", "data", "line", "message"),
    [
        (TEXT, b"1\ta\tb\n", 1, "extra data after last expected column"),
        (TEXT, b"1\ta\n2\n", 2, "missing data for column number 2"),
        (TEXT, b"1\ta\n2\tb\r\n", 2, "literal carriage return found in data"),
        (TEXT, b"1\ta\r\n2\tb\n", 2, "literal newline found in data"),
        (TEXT, b"1\ta\r2\tb\n", 2, "literal newline found in data"),
        (TEXT, b"1\ta\r\n2\tb\rc\r\n", 2, "literal carriage return found in data"),
        (TEXT, b"1\ta\\.\n", 1, "end-of-copy marker is not alone on its line"),
        (TEXT, b"1\ta\n\\.x\n", 2, "end-of-copy marker is not alone on its line"),
        (TEXT, b"1\ta\n\\.", 2, "end-of-copy marker is not alone on its line"),
        (TEXT, b"1\ta\n\\.\r\n", 2, "end-of-copy marker does not match previous newline style"),
        (TEXT, b"1\ta\r\n\\.\n", 2, "end-of-copy marker does not match previous newline style"),
        (CSV, b'1,"a\n', 1, "unterminated CSV quoted field"),
        (CSV, b'1,"a"\n2,"b\n', 2, "unterminated CSV quoted field"),
        (CSV, b"1,a\n2,b\r\n", 2, "unquoted carriage return found in data"),
        (CSV, b"1,a\n\\.\r\n", 2, "end-of-copy marker does not match previous newline style"),
    ],
)
def test_malformed_data_is_refused_with_the_line_number(
    options: CopyOptions, data: bytes, line: int, message: str
) -> None:
    with pytest.raises(BadCopyFileFormat) as info:
        rewrite(options, [None, upper], [data])
    assert info.value.sqlstate == "22P04"
    assert info.value.line == line
    assert str(info.value) == f"COPY data line {line}: {message}"


def test_missing_column_is_named_when_names_are_known() -> None:
    rw = CopyRowRewriter(TEXT, [None, upper], column_names=["id", "email"])
    with pytest.raises(BadCopyFileFormat, match='missing data for column "email"'):
        rw.feed(b"1\n")


@pytest.mark.parametrize(
    ("options", "data"),
    [
        (TEXT, b"\\xc3(\n"),
        (TEXT, b"\\0\n"),
        (TEXT, b"\\355\\240\\200\n"),  # a UTF-16 surrogate in UTF-8 form
    ],
)
def test_protected_value_must_be_valid_utf8(options: CopyOptions, data: bytes) -> None:
    with pytest.raises(CharacterNotInRepertoire) as info:
        rewrite(options, [upper], [data])
    assert info.value.sqlstate == "22021"
    assert info.value.line == 1
    # an unprotected field is the server's to check
    assert rewrite(options, [None], [data]) == data


@pytest.mark.parametrize(
    ("options", "ncols", "data", "cuts", "line"),
    [
        (CSV, 1, b'"\xff"\n', [], 1),
        (CSV, 1, b"\xc3\n", [], 1),
        (CSV, 3, b',,\xc3""\xa9\n,,\n', [], 1),  # valid once un-quoted, but the raw bytes are not
        (TEXT, 1, b"\xc3\\\xa9\n", [], 1),  # the same with a text-format escape
        (TEXT, 1, b"a\x00b\n", [], 1),
        (TEXT, 1, b"ok\n\xe2\x82", [4], 2),  # cut short at the end of data
    ],
)
def test_raw_input_must_be_valid_utf8_in_any_field(
    options: CopyOptions, ncols: int, data: bytes, cuts: list[int], line: int
) -> None:
    # The server verifies the raw bytes before reading fields (CopyConvertBuf): unprotected fields too.
    for transform in (upper, None):
        with pytest.raises(CharacterNotInRepertoire) as info:
            rewrite(options, [transform] * ncols, split_at(data, cuts))
        assert info.value.sqlstate == "22021"
        assert info.value.line == line


def test_utf8_split_between_payloads_waits_for_its_end() -> None:
    data = "é€😀\tx\n".encode()
    for cut in range(1, len(data)):
        assert rewrite(TEXT, [upper, None], [data[:cut], data[cut:]]) == "É€😀\tx\n".encode()
    rw = CopyRowRewriter(TEXT, [upper])
    assert rw.feed(b"a\xe2") == b""
    assert rw.feed(b"\x82") == b""
    assert rw.feed(b"\xac\n") == "A€\n".encode()


def test_bytes_after_the_end_marker_are_never_verified() -> None:
    # The server stops reading at the marker, so it never sees what follows: neither does the rewriter.
    assert rewrite(TEXT, [upper], [b"a\n\\.\n\xff\x00\xc3"]) == b"A\n\\.\n"
    assert rewrite(TEXT, [upper], [b"a\n\\.\n", b"\xc3"]) == b"A\n\\.\n"


def test_transform_returning_nul_is_refused() -> None:
    with pytest.raises(CharacterNotInRepertoire):
        rewrite(TEXT, [lambda _: b"a\x00b"], [b"x\n"])


def test_memory_is_bounded_by_max_line_bytes() -> None:
    rw = CopyRowRewriter(TEXT, [upper], max_line_bytes=10)
    assert rw.feed(b"short\nabc") == b"SHORT\n"
    assert rw.buffered == 3
    with pytest.raises(CopyLineTooLong) as info:
        rw.feed(b"defghijkl")
    assert info.value.sqlstate == "54000"
    assert info.value.line == 2
    with pytest.raises(CopyLineTooLong):
        CopyRowRewriter(TEXT, [upper], max_line_bytes=10).feed(b"0123456789abc\n")


def test_buffer_holds_only_the_incomplete_line() -> None:
    rw = CopyRowRewriter(CSV, [None, upper])
    assert rw.feed(b'1,"multi\nline') == b""
    assert rw.buffered == len(b'1,"multi\nline')
    assert rw.feed(b'"\n2,x\n3,') == b'1,"MULTI\nLINE"\n2,X\n'
    assert rw.buffered == 2
    assert rw.line_number == 2
    assert rw.finish() == b"3,"  # the unquoted empty field is NULL and stays NULL
    assert rw.rows == 3


def test_last_line_without_newline_is_rewritten_at_finish() -> None:
    rw = CopyRowRewriter(TEXT, [upper])
    assert rw.feed(b"a\nb") == b"A\n"
    assert rw.finish() == b"B"
    assert rw.finish() == b""
    with pytest.raises(RuntimeError):
        rw.feed(b"x")


def test_first_line_cr_decided_at_finish() -> None:
    rw = CopyRowRewriter(TEXT, [upper])
    assert rw.feed(b"a\r") == b""  # CR or CRLF? the next byte decides
    assert rw.finish() == b"A\r"


def test_transform_errors_propagate_with_the_line_known() -> None:
    class Refused(Exception):
        pass

    def refuse_second(value: bytes) -> bytes:
        if value == b"bad":
            raise Refused
        return value

    rw = CopyRowRewriter(TEXT, [None, refuse_second])
    with pytest.raises(Refused):
        rw.feed(b"1\tok\n2\tbad\n")
    assert rw.line_number == 2
    # no guessing where the next row starts after a failure
    with pytest.raises(RuntimeError):
        rw.feed(b"3\tok\n")
    with pytest.raises(RuntimeError):
        rw.finish()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"format": "binary"},
        {"delimiter": "ab"},
        {"delimiter": "é"},
        {"delimiter": "\n"},
        {"delimiter": "\\"},
        {"delimiter": "x"},
        {"null": "a\rb"},
        {"delimiter": ",", "null": "a,b"},
        {"format": "csv", "quote": ","},
        {"format": "csv", "quote": "\n"},
        {"format": "csv", "null": '"'},
        {"format": "csv", "escape": "ab"},
        {"default": "\\N"},
        {"format": "csv", "force_quote": frozenset({-1})},
    ],
)
def test_options_the_server_refuses_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidCopyOptions):
        CopyOptions(**kwargs)  # type: ignore[arg-type]


def test_options_defaults() -> None:
    assert (TEXT.delimiter_char, TEXT.null_string) == ("\t", "\\N")
    assert (CSV.delimiter_char, CSV.null_string, CSV.quote_char, CSV.escape_char) == (",", "", '"', '"')
    assert CopyOptions(format="csv", quote="'").escape_char == "'"
    # what a caller that resolves every default passes for text format is accepted (and ignored)
    text = CopyOptions(format="text", delimiter="\t", null="\\N", quote='"', escape='"')
    assert rewrite(text, [upper], [b'a"b\n']) == b'A"B\n'
    with pytest.raises(ValueError, match="at least one column"):
        CopyRowRewriter(TEXT, [])


# -- chunking -----------------------------------------------------------------------------------------
TRICKY_STREAMS: list[tuple[CopyOptions, int, tuple[int, ...], bytes]] = [
    (TEXT, 3, (1, 2), b"1\ta\\tb\t\\N\r\n2\t\\\\\t\\101\r\n3\t\\x4\t\\\r\r\n\\.\r\nrest"),
    (TEXT, 2, (0,), b"x\\\ny\tz\n\\.\n"),
    (CopyOptions(header=True), 2, (1,), b"h1\th2\r\\\r\tb\r"),
    (CSV, 3, (0, 2), b'"a,""\r\n",,""\r\n\\.x,"\\.",\r\n"\xc3\xa9",\\,x'),
    (CopyOptions(format="csv", escape="\\"), 2, (1,), b'a,"\\"\n\\\\"\nb,"\\x"\n\\.\n'),
    (CopyOptions(format="csv", header=True), 2, (0, 1), b'"h\n1",h2\n\\.\n'),
]


@pytest.mark.parametrize(("options", "ncols", "protected", "data"), TRICKY_STREAMS)
def test_every_split_point_gives_the_same_output(
    options: CopyOptions, ncols: int, protected: tuple[int, ...], data: bytes
) -> None:
    transforms = [mark if i in protected else None for i in range(ncols)]
    whole = rewrite(options, transforms, [data])
    for cut in range(len(data) + 1):
        assert rewrite(options, transforms, [data[:cut], data[cut:]]) == whole, cut
    assert rewrite(options, transforms, [data[i : i + 1] for i in range(len(data))]) == whole
    check_against_oracle(options, protected, ncols, data, [])


# -- properties -----------------------------------------------------------------------------------------
OPTION_SETS = [
    TEXT,
    CopyOptions(delimiter="|", null="NULL"),
    CopyOptions(delimiter=",", header=True),
    CopyOptions(default="\\D"),
    CSV,
    CopyOptions(format="csv", escape="\\"),
    CopyOptions(format="csv", delimiter="\t", quote="'", null="\\N"),
    CopyOptions(format="csv", header=True, force_not_null=frozenset({0}), force_null=frozenset({1})),
    CopyOptions(format="csv", csv_end_marker=False),
    CopyOptions(format="csv", default="D"),
]
ATOMS = [
    b"a", b"Z", b"N", b"x", b"0", b"7", b"b", b".", b" ", b"D",
    b"\t", b",", b"|", b'"', b"'", b"\\", b"\n", b"\r", b"\r\n",
    b"\\N", b"\\.", b"\\\\", b"\\x4", b"\\101", b"\\t", b"\\\n", b'""', b"\\D",
    b"\xc3\xa9", b"\xe2\x82\xac", b"\xc3", b"\xff", b"\n\\.", b"\r\n\\.",
]  # fmt: skip
EOLS = [b"\n", b"\r\n", b"\r"]


@st.composite
def copy_streams(draw: st.DrawFn) -> tuple[CopyOptions, int, tuple[int, ...], bytes, list[int]]:
    options = draw(st.sampled_from(OPTION_SETS))
    ncols = draw(st.integers(1, 3))
    protected = tuple(i for i in range(ncols) if draw(st.booleans()))
    if draw(st.booleans()):
        data = b"".join(draw(st.lists(st.sampled_from(ATOMS), max_size=40)))
    else:
        # mostly well-formed: rows of ncols fields, one line ending, maybe a marker and trailing junk
        delim = options.delimiter_char.encode()
        eol = draw(st.sampled_from(EOLS))
        field = st.lists(st.sampled_from(ATOMS[:10] + ATOMS[19:]), max_size=4).map(b"".join)
        quoted = field.map(lambda f: b'"' + f.replace(b'"', b'""') + b'"')
        cell = st.one_of(field, quoted) if options.format == "csv" else field
        rows = draw(st.lists(st.lists(cell, min_size=ncols, max_size=ncols), max_size=5))
        data = b"".join(delim.join(r) + eol for r in rows)
        if draw(st.booleans()):
            data += b"\\." + eol + draw(st.sampled_from([b"", b"junk\n", b'"open']))
        elif len(rows) > 0 and draw(st.booleans()):
            data = data[: -len(eol)]
    cuts = draw(st.lists(st.integers(0, max(len(data), 0)), max_size=6))
    return options, ncols, protected, data, cuts


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(copy_streams())
@example((TEXT, 1, (0,), b"\\N\\", []))
@example((CSV, 2, (0, 1), b'"a""b",\\.\n\\.\n', [3]))
# The server reads the byte after a "\." that follows data before it decides: invalid UTF-8 there is an
# encoding error, not a broken end marker (whole, and cut before the bad byte).
@example((TEXT, 1, (), b"a\\.\xc3\n", []))
@example((TEXT, 1, (0,), b"a\\.\xc3\n", [3]))
def test_rewriter_agrees_with_the_servers_algorithm(
    case: tuple[CopyOptions, int, tuple[int, ...], bytes, list[int]],
) -> None:
    options, ncols, protected, data, cuts = case
    check_against_oracle(options, protected, ncols, data, cuts)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=8), st.sampled_from(OPTION_SETS))
def test_any_bytes_either_rewrite_or_raise_a_copy_error(data: bytes, cuts: list[int], options: CopyOptions) -> None:
    try:
        out = rewrite(options, [None, mark], split_at(data, cuts))
    except CopyDataError:
        return
    assert out == rewrite(options, [None, mark], [data])


def test_large_streams_in_odd_chunks() -> None:
    row = b'%d,"multi\nline, with ""quotes""",\\x41\xc3\xa9,\n'
    data = b"".join(row % i for i in range(3000))
    whole = rewrite(CSV, [None, upper, upper, None], [data])
    assert whole.count(b"\n") == data.count(b"\n")
    assert whole.startswith(b'0,"MULTI\nLINE, WITH ""QUOTES""",\\X41\xc3\x89,\n')
    chunks = [data[i : i + 997] for i in range(0, len(data), 997)]
    assert rewrite(CSV, [None, upper, upper, None], chunks) == whole
