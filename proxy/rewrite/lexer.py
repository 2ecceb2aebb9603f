"""PostgreSQL 15's SQL scanner, as far as token boundaries go: where each token starts and ends, which
of them are string constants read with backslash escapes, and where the server's scanner would stop
with an error.

Why pgveil has its own scanner: libpg_query (pglast) carries a newer grammar than the server it may
sit in front of, and it always reads ``standard_conforming_strings = on``. The server's reading is the
one that counts, so pgveil checks that both agree before it gives a text any meaning: see
``proxy/rewrite/reading.py`` for the session-dependent checks and ``analysis.py`` for the version
check. This module follows ``src/backend/parser/scan.l`` of PostgreSQL 15 rule by rule where a rule can
move a boundary (quotes, comments, dollar quotes, string continuation, numbers with trailing junk,
operators that contain a comment start); it does not compute literal values or recognise keywords.

The input is a ``str`` whose characters at or above U+0080 stand for the high bytes of a multibyte
character: PostgreSQL treats every byte >= 0x80 as an identifier character, so one such character or
several read alike. Offsets are indices into that ``str``, half-open.

Must not: do I/O, keep state between calls, raise (a text the server would reject gives ``error``), or
put statement text in messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = ["Scan", "Token", "TokenKind", "scan", "statement_spans"]


class TokenKind(Enum):
    IDENT = "ident"  # identifier or keyword, including the ``N`` of ``N'...'``
    QUOTED_IDENT = "quoted_ident"  # "..." or U&"..."
    STRING = "string"  # '...', E'...', U&'...', B'...', X'...' with any continuations
    DOLLAR_STRING = "dollar_string"
    NUMBER = "number"
    PARAM = "param"
    OPERATOR = "operator"  # an operator or one of the single-character tokens (``;`` included)
    COMMENT = "comment"
    OTHER = "other"  # a character no rule accepts (the grammar rejects it)


@dataclass(frozen=True, slots=True)
class Token:
    start: int
    end: int
    kind: TokenKind
    # A string constant read with backslash escapes (E'...', or '...' with standard_conforming_strings
    # off) whose body contains a backslash: its value depends on that mode.
    escapes: bool = False


@dataclass(frozen=True, slots=True)
class Scan:
    tokens: tuple[Token, ...]
    error: str | None = None  # the server's scanner stops here with 42601 (or 0A000 for U&'' with scs off)
    error_at: int = -1

    def reading(self) -> tuple[tuple[int, int, bool], ...] | str:
        """What must be equal for two scans to read a text alike: every token's span and escape mode,
        or the error that makes the server reject the whole text."""
        if self.error is not None:
            return self.error
        return tuple((t.start, t.end, t.escapes) for t in self.tokens)


# scan.l: space [ \t\n\r\f]; vertical tab is not whitespace before PostgreSQL 16.
_SPACE = frozenset(" \t\n\r\f")
_HORIZ_SPACE = frozenset(" \t\f")
_NEWLINE = frozenset("\n\r")
_OP_CHARS = frozenset("~!@#^&|`?+-*/%<>=")
_SELF = frozenset(",()[].;:+-*/%^<>=")
_NON_SQL_OP = frozenset("~!@#^&|`?%")
_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")
_NAMEDATALEN = 64


# Runs the scanner's rules consume in one step (``\x80-\U0010ffff``: the high bytes of multibyte characters).
_SPACES = re.compile(r"[ \t\n\r\f]+")
_IDENT_CONT = re.compile(r"[A-Za-z0-9_$\x80-\U0010ffff]*")
_QUOTED_BODY = re.compile(r"[^']*")
_ESCAPED_BODY = re.compile(r"[^'\\]*")


def _run_end(pattern: re.Pattern[str], s: str, i: int) -> int:
    m = pattern.match(s, i)
    return i if m is None else m.end()


def _ident_start(ch: str) -> bool:
    return (ch.isascii() and (ch.isalpha() or ch == "_")) or ch >= "\x80"


def _ident_cont(ch: str) -> bool:
    return _ident_start(ch) or ch in _DIGITS or ch == "$"


def _dolq_cont(ch: str) -> bool:
    return _ident_start(ch) or ch in _DIGITS


class _LexError(Exception):
    def __init__(self, message: str, at: int) -> None:
        self.message = message
        self.at = at


def scan(sql: str, *, standard_conforming_strings: bool = True) -> Scan:
    """The tokens of ``sql`` as PostgreSQL 15 scans them with the given setting."""
    tokens: list[Token] = []
    try:
        _scan(sql, standard_conforming_strings, tokens)
    except _LexError as e:
        return Scan(tuple(tokens), e.message, e.at)
    return Scan(tuple(tokens))


def statement_spans(sql: str, result: Scan) -> list[tuple[int, int]]:
    """The non-empty statements of a scanned text, split at ``;`` tokens, as (start, end) from their
    first to their last token (comments excluded).

    Inside the body of ``CREATE [OR REPLACE] FUNCTION|PROCEDURE ... BEGIN ATOMIC ... END`` and inside
    parentheses (``CREATE RULE ... DO (a; b)``) the grammar keeps the semicolons; like psql, a
    ``BEGIN`` or ``CASE`` in such a routine opens a level that ``END`` closes, and only a ``;`` outside
    every level and parenthesis ends the statement.
    """
    spans: list[tuple[int, int]] = []
    first = last = -1
    words: list[str] = []  # the statement's leading identifiers, lower-cased (up to four)
    depth = 0
    parens = 0  # CREATE RULE ... DO (a; b) keeps its semicolons inside parentheses
    for t in result.tokens:
        if t.kind is TokenKind.COMMENT:
            continue
        text = sql[t.start : t.end]
        if t.kind is TokenKind.OPERATOR and text in ("(", ")"):
            parens += 1 if text == "(" else -1 if parens > 0 else 0
        if t.kind is TokenKind.OPERATOR and text == ";" and depth == 0 and parens == 0:
            if first >= 0:
                spans.append((first, last))
            first = last = -1
            words = []
            parens = 0
            continue
        if first < 0:
            first = t.start
        last = t.end
        if t.kind is TokenKind.IDENT:
            word = text.lower()
            if len(words) < 4:
                words.append(word)
            if _routine(words):
                if word in ("begin", "case"):
                    depth += 1
                elif word == "end" and depth > 0:
                    depth -= 1
    if first >= 0:
        spans.append((first, last))
    return spans


def _routine(words: list[str]) -> bool:
    """CREATE [OR REPLACE] FUNCTION|PROCEDURE"""
    if len(words) < 2 or words[0] != "create":
        return False
    kind = words[3] if len(words) > 3 and words[1:3] == ["or", "replace"] else words[1]
    return kind in ("function", "procedure")


def _scan(s: str, scs: bool, out: list[Token]) -> None:
    n = len(s)
    i = 0
    while i < n:
        ch = s[i]
        nxt = s[i + 1] if i + 1 < n else ""
        if ch in _SPACE:
            i = _run_end(_SPACES, s, i)
            continue
        if ch == "-" and nxt == "-":
            j = _line_end(s, i)
            out.append(Token(i, j, TokenKind.COMMENT))
            i = j
            continue
        if ch == "/" and nxt == "*":
            j = _comment_end(s, i)
            out.append(Token(i, j, TokenKind.COMMENT))
            i = j
            continue
        low = ch.lower()
        if low in "bx" and nxt == "'":
            i = _quoted(s, i, i + 2, "bits", out)
            continue
        if low == "e" and nxt == "'":
            i = _quoted(s, i, i + 2, "escape", out)
            continue
        if low == "n" and nxt == "'":  # NCHAR keyword, then the quote is scanned as a string start
            out.append(Token(i, i + 1, TokenKind.IDENT))
            i += 1
            continue
        if low == "u" and nxt == "&" and i + 2 < n and s[i + 2] in "'\"":
            if s[i + 2] == "'":
                if not scs:
                    raise _LexError("unsafe use of string constant with Unicode escapes", i)
                i = _quoted(s, i, i + 3, "plain", out)
            else:
                i = _quoted_ident(s, i, i + 3, out)
            continue
        if ch == "'":
            i = _quoted(s, i, i + 1, "plain" if scs else "escape", out)
            continue
        if ch == '"':
            i = _quoted_ident(s, i, i + 1, out)
            continue
        if ch == "$":
            i = _dollar(s, i, out)
            continue
        if ch in _DIGITS or (ch == "." and nxt in _DIGITS):
            i = _number(s, i, out)
            continue
        if _ident_start(ch):
            j = _run_end(_IDENT_CONT, s, i + 1)
            out.append(Token(i, j, TokenKind.IDENT))
            i = j
            continue
        if ch == ":" and nxt in (":", "="):  # typecast, colon_equals
            out.append(Token(i, i + 2, TokenKind.OPERATOR))
            i += 2
            continue
        if ch == "." and nxt == ".":  # dot_dot
            out.append(Token(i, i + 2, TokenKind.OPERATOR))
            i += 2
            continue
        if ch in _OP_CHARS:
            i = _operator(s, i, out)
            continue
        if ch in _SELF:
            out.append(Token(i, i + 1, TokenKind.OPERATOR))
            i += 1
            continue
        out.append(Token(i, i + 1, TokenKind.OTHER))
        i += 1


def _line_end(s: str, i: int) -> int:
    j = i
    n = len(s)
    while j < n and s[j] not in _NEWLINE:
        j += 1
    return j


def _comment_end(s: str, i: int) -> int:
    """End of the (nested) C-style comment that starts at ``i``."""
    n = len(s)
    depth = 0
    j = i + 2
    while j < n:
        two = s[j : j + 2]
        if two == "/*":
            depth += 1
            j += 2
        elif two == "*/":
            if depth == 0:
                return j + 2
            depth -= 1
            j += 2
        else:
            j += 1
    raise _LexError("unterminated /* comment", i)


def _quoted(s: str, start: int, body: int, mode: str, out: list[Token]) -> int:
    """A quoted string from its opening quote's end ``body``; ``mode`` is "plain" ('...' read as
    standard, U&'...'), "escape" (E'...', or '...' with standard_conforming_strings off) or "bits"
    (B'...', X'...', where ``''`` ends the constant and starts another). Continuations (a quote,
    whitespace with a newline, a quote) join the segments."""
    n = len(s)
    j = body
    escapes = False
    while True:
        while True:
            if j >= n:
                raise _LexError("unterminated quoted string", start)
            j = _run_end(_ESCAPED_BODY if mode == "escape" else _QUOTED_BODY, s, j)
            if j >= n:
                raise _LexError("unterminated quoted string", start)
            ch = s[j]
            if ch == "'":
                if mode != "bits" and j + 1 < n and s[j + 1] == "'":
                    j += 2
                    continue
                j += 1
                break
            if ch == "\\" and mode == "escape":
                escapes = True
                j = _escape(s, j, start)
                continue
            j += 1
        cont = _continuation(s, j)
        if cont < 0:
            out.append(Token(start, j, TokenKind.STRING, escapes))
            return j
        j = cont


def _escape(s: str, j: int, start: int) -> int:
    """Past one backslash escape inside E'...' (scan.l xeescape, xeoctesc, xehexesc, xeunicode, and the
    surrogate-pair state xeu)."""
    n = len(s)
    if j + 1 >= n:
        return j + 1  # a backslash just before the end: the string is unterminated anyway
    if s[j + 1] not in "uU":
        return j + 2  # octal and hex escapes consume only digits, which cannot end the string
    k, value = _unicode_escape(s, j, start)
    if 0xDC00 <= value <= 0xDFFF:
        raise _LexError("invalid Unicode surrogate pair", start)
    if 0xD800 <= value <= 0xDBFF:
        if not (s.startswith("\\u", k) or s.startswith("\\U", k)):
            raise _LexError("invalid Unicode surrogate pair", start)
        k, low = _unicode_escape(s, k, start)
        if not 0xDC00 <= low <= 0xDFFF:
            raise _LexError("invalid Unicode surrogate pair", start)
    elif value == 0 or value > 0x10FFFF:
        raise _LexError("invalid Unicode escape value", start)
    return k


def _unicode_escape(s: str, j: int, start: int) -> tuple[int, int]:
    """``\\uXXXX`` or ``\\UXXXXXXXX`` at ``j``: the index past it and its value."""
    want = 4 if s[j + 1] == "u" else 8
    k = j + 2
    while k < len(s) and k - (j + 2) < want and s[k] in _HEX:
        k += 1
    if k - (j + 2) < want:
        raise _LexError("invalid Unicode escape", start)
    return k, int(s[j + 2 : k], 16)


def _continuation(s: str, j: int) -> int:
    """After a closing quote at ``j - 1``: the index just past the next segment's opening quote if
    ``{quote}{whitespace_with_newline}{quote}`` follows, else -1."""
    n = len(s)
    k = j
    while k < n:  # horiz_whitespace*: spaces and -- comments, no newline yet
        if s[k] in _HORIZ_SPACE:
            k += 1
        elif s.startswith("--", k):
            k = _line_end(s, k)
        else:
            break
    if k >= n or s[k] not in _NEWLINE:
        return -1
    k += 1
    while k < n:  # special_whitespace*: spaces, or a -- comment that ends in a newline
        if s[k] in _SPACE:
            k += 1
        elif s.startswith("--", k):
            e = _line_end(s, k)
            if e >= n:
                return -1
            k = e + 1
        else:
            break
    if k < n and s[k] == "'":
        return k + 1
    return -1


def _quoted_ident(s: str, start: int, body: int, out: list[Token]) -> int:
    n = len(s)
    j = body
    while True:
        if j >= n:
            raise _LexError("unterminated quoted identifier", start)
        if s[j] == '"':
            if j + 1 < n and s[j + 1] == '"':
                j += 2
                continue
            break
        j += 1
    if j == body:
        raise _LexError("zero-length delimited identifier", start)
    out.append(Token(start, j + 1, TokenKind.QUOTED_IDENT))
    return j + 1


def _dollar(s: str, i: int, out: list[Token]) -> int:
    n = len(s)
    j = i + 1
    if j < n and s[j] in _DIGITS:  # param, param_junk
        while j < n and s[j] in _DIGITS:
            j += 1
        if j < n and _ident_start(s[j]):
            raise _LexError("trailing junk after parameter", i)
        out.append(Token(i, j, TokenKind.PARAM))
        return j
    if j < n and _ident_start(s[j]):
        while j < n and _dolq_cont(s[j]):
            j += 1
    if j < n and s[j] == "$":  # dolqdelim
        delim = s[i : j + 1]
        end = s.find(delim, j + 1)
        if end < 0:
            raise _LexError("unterminated dollar-quoted string", i)
        end += len(delim)
        out.append(Token(i, end, TokenKind.DOLLAR_STRING))
        return end
    out.append(Token(i, i + 1, TokenKind.OTHER))  # dolqfailed, or a lone $: the grammar rejects it
    return i + 1


def _number(s: str, i: int, out: list[Token]) -> int:
    """integer, decimal, real and their PostgreSQL 15 failure rules (decimalfail, realfail,
    integer_junk, decimal_junk, real_junk)."""
    n = len(s)
    j = i
    while j < n and s[j] in _DIGITS:
        j += 1
    prefix_ends = {j} if j > i else set()  # where an {integer} or {decimal} prefix ends
    if j < n and s[j] == ".":
        if j + 1 < n and s[j + 1] == "." and j > i:  # decimalfail: 1..  is an integer, then ..
            out.append(Token(i, j, TokenKind.NUMBER))
            return j
        j += 1
        while j < n and s[j] in _DIGITS:
            j += 1
        prefix_ends.add(j)
    if j < n and s[j] in "eE":
        k = j + 1
        if k < n and s[k] in "+-":
            k += 1
            if k >= n or s[k] not in _DIGITS:
                raise _LexError("trailing junk after numeric literal", i)  # realfail
        if k < n and s[k] in _DIGITS:
            while k < n and s[k] in _DIGITS:
                k += 1
            j = k
            prefix_ends.add(j)
    # integer_junk, decimal_junk, real_junk: {integer}, {decimal} or {real} followed by an identifier
    # (which may go on with digits and $). flex takes the longest match, so a junk rule wins whenever
    # the identifier reaches past the number's own end ("1e3$" is junk, "1e3" a real).
    for p in sorted(prefix_ends):
        if p < n and _ident_start(s[p]):
            q = p + 1
            while q < n and _ident_cont(s[q]):
                q += 1
            if q > j or p == j:
                raise _LexError("trailing junk after numeric literal", i)
    out.append(Token(i, j, TokenKind.NUMBER))
    return j


def _operator(s: str, i: int, out: list[Token]) -> int:
    n = len(s)
    j = i
    while j < n and s[j] in _OP_CHARS:
        j += 1
    text = s[i:j]
    cut = len(text)
    for marker in ("/*", "--"):
        k = text.find(marker)
        if k >= 0:
            cut = min(cut, k)
    # '+' and '-' cannot end a multi-character operator unless it contains a non-SQL operator character.
    while cut > 1 and text[cut - 1] in "+-":
        if any(c in _NON_SQL_OP for c in text[: cut - 1]):
            break
        cut -= 1
    if cut >= _NAMEDATALEN:
        raise _LexError("operator too long", i)
    out.append(Token(i, i + cut, TokenKind.OPERATOR))
    return i + cut
