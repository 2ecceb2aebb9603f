"""SQL-level statements that act on the session's prepared statements: PREPARE, EXECUTE, DEALLOCATE
[ALL] and DISCARD ALL (which share the protocol's statement namespace), and DO blocks with dynamic SQL,
which may do any of that unseen.

The relay applies them to its model of the session when their CommandComplete arrives, and an EXECUTE
of a statement that takes encrypted parameters is refused: its arguments are SQL literals that pgveil
would have to seal inside someone else's statement text. Pure: it reads the text, nothing else.
"""

from __future__ import annotations

import re
from functools import lru_cache

from pglast import ast, parse_sql
from pglast.enums.parsenodes import DiscardMode

from proxy.protocol.encryption import NamespaceAction, NamespaceOp
from proxy.rewrite.analysis import is_dynamic_code

# Every statement of interest starts with one of these keywords (EXECUTE also under EXPLAIN and CREATE
# TABLE AS); a text without any of them, the usual case, is not parsed again.
_KEYWORDS = re.compile(r"(?i)\b(?:prepare|execute|deallocate|discard|do)\b")
_DO = re.compile(r"(?i)\bdo\b")
_EXECUTE = re.compile(r"(?i)\bexecute\b")
# A longer text is not parsed a second time (that would hold up every session): an EXECUTE in it counts
# as one of a statement pgveil cannot name (NamespaceOp with the empty name, which no EXECUTE can have).
# Its PREPARE and DEALLOCATE are not followed; the model then keeps names the server may have dropped,
# or lacks one it created, and a Bind of either is decided as unconfirmed.
MAX_PARSED_TEXT = 64 * 1024
UNREAD_EXECUTE = NamespaceOp(NamespaceAction.EXECUTE, "")
REPLACE_ALL = NamespaceOp(NamespaceAction.REPLACE_ALL)


def namespace_ops(sql: str) -> tuple[NamespaceOp, ...]:
    """The namespace operations of ``sql``, in text order. A text the parser rejects yields none: the
    server rejects it too, before anything runs."""
    if _KEYWORDS.search(sql) is None:
        return ()
    if len(sql) > MAX_PARSED_TEXT:
        unread = (UNREAD_EXECUTE,) if _EXECUTE.search(sql) else ()
        return (*unread, REPLACE_ALL) if _DO.search(sql) else unread
    return _parsed_ops(sql)


@lru_cache(maxsize=1024)
def _parsed_ops(sql: str) -> tuple[NamespaceOp, ...]:
    try:
        stmts = parse_sql(sql)
    except Exception:  # pglast.parser.ParseError; the server reports the syntax error itself
        return ()
    ops: list[NamespaceOp] = []
    for raw in stmts:
        _collect(raw.stmt, ops)
    return tuple(ops)


def _collect(node: object, ops: list[NamespaceOp]) -> None:
    if isinstance(node, ast.PrepareStmt):
        ops.append(NamespaceOp(NamespaceAction.PREPARE, node.name or ""))
    elif isinstance(node, ast.ExecuteStmt):
        ops.append(NamespaceOp(NamespaceAction.EXECUTE, node.name or ""))
    elif isinstance(node, ast.DeallocateStmt):
        if getattr(node, "isall", False) or node.name is None:
            ops.append(NamespaceOp(NamespaceAction.DEALLOCATE_ALL))
        else:
            ops.append(NamespaceOp(NamespaceAction.DEALLOCATE, node.name))
    elif isinstance(node, ast.DoStmt):
        language, code = "plpgsql", ""
        for arg in node.args or ():
            value = getattr(getattr(arg, "arg", None), "sval", None)
            if getattr(arg, "defname", None) == "language" and isinstance(value, str):
                language = value
            elif getattr(arg, "defname", None) == "as" and isinstance(value, str):
                code = value
        if is_dynamic_code(language, code):
            ops.append(REPLACE_ALL)
    elif isinstance(node, ast.DiscardStmt):
        if node.target == DiscardMode.DISCARD_ALL:
            ops.append(NamespaceOp(NamespaceAction.DEALLOCATE_ALL))
    elif isinstance(node, ast.ExplainStmt | ast.CreateTableAsStmt):
        _collect(node.query, ops)
