"""Helpers for libpg_query's JSON parse trees (``pglast.parser.parse_sql_json``).

A field typed as a generic Node holds a wrapped node, ``{"ColumnRef": {...}}``; a field typed as a
specific node (``SelectStmt.larg``, ``InsertStmt.relation``) holds the struct itself, unwrapped. Fields
with default values (0, false, empty) are omitted.

Must not: decide anything about protected columns.
"""

from __future__ import annotations

from typing import Any

from proxy.rewrite.catalog import Catalog, ProtectedTable

Node = dict[str, Any]


def node_type(node: Node) -> tuple[str, Node]:
    """A wrapped node ``{"ColumnRef": {...}}`` as ``("ColumnRef", {...})``."""
    for k, v in node.items():
        return k, v
    return "", {}


def is_wrapped(value: Any) -> bool:
    """``{"ColumnRef": {...}}``: a node behind a generic Node pointer, tagged with its type."""
    return isinstance(value, dict) and len(value) == 1 and next(iter(value))[:1].isupper()


def names_of(nodes: list[Node]) -> list[str]:
    return [str(n.get("String", {}).get("sval", "")) for n in nodes if "String" in n]


def last_name(nodes: list[Node]) -> str:
    names = names_of(nodes)
    return names[-1] if names else ""


def column_fields(body: Node) -> tuple[list[str], bool]:
    """A ColumnRef's names and whether it ends in ``*``."""
    fields = body.get("fields", [])
    star = bool(fields) and "A_Star" in fields[-1]
    return names_of(fields), star


def string_value(arg: Node | None) -> str | None:
    if arg is None:
        return None
    kind, body = node_type(arg)
    if kind == "String":
        return str(body.get("sval", ""))
    if kind == "Integer":
        return str(body.get("ival", 0))
    if kind == "Float":
        return str(body.get("fval", "0"))
    if kind == "Boolean":
        return "true" if body.get("boolval") else "false"
    return None


def first_protected_table(node: Any, catalog: Catalog) -> ProtectedTable | None:
    """Any table reference in the tree that resolves to a protected table, CTE names ignored (so this
    over-approximates: a CTE that shadows a protected table's name still counts)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if "relname" in n and isinstance(n["relname"], str):
                t = catalog.lookup(n.get("schemaname"), n["relname"])
                if t is not None:
                    return t
            drop = n.get("DropStmt")
            if isinstance(drop, dict):
                for obj in drop.get("objects", []):
                    names = [i.get("String", {}).get("sval", "") for i in obj.get("List", {}).get("items", [])]
                    if names:
                        t = catalog.lookup(names[-2] if len(names) > 1 else None, names[-1])
                        if t is not None:
                            return t
            stack.extend(reversed([v for v in n.values() if isinstance(v, dict | list)]))
        elif isinstance(n, list):
            stack.extend(reversed([v for v in n if isinstance(v, dict | list)]))
    return None


def named_in_strings(node: Any, catalog: Catalog) -> ProtectedTable | None:
    """A protected table whose name occurs in a string constant (the body of a DO block)."""
    tables = tables_named_in_strings(node, catalog)
    return tables[0] if tables else None


def tables_named_in_strings(node: Any, catalog: Catalog) -> list[ProtectedTable]:
    """Every protected table whose name occurs (case-insensitively, in any schema) in a string constant."""
    strings: list[str] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            for k, v in n.items():
                if k == "sval" and isinstance(v, str):
                    strings.append(v.lower())
                elif isinstance(v, dict | list):
                    stack.append(v)
        elif isinstance(n, list):
            stack.extend(n)
    return [t for t in catalog.tables.values() if any(t.name.lower() in s for s in strings)]


def is_constant(node: Any) -> bool:
    """A constant, possibly cast (``'x'``, ``'t'::regclass``, ``true``)."""
    if not isinstance(node, dict):
        return False
    kind, body = node_type(node)
    if kind == "TypeCast":
        return is_constant(body.get("arg"))
    return kind == "A_Const"


def function_calls(node: Any, names: frozenset[str]) -> list[Node]:
    """The body of every FuncCall in the tree whose last name part (lower-cased) is in ``names``."""
    out: list[Node] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            call = n.get("FuncCall")
            if isinstance(call, dict) and last_name(call.get("funcname", [])).lower() in names:
                out.append(call)
            stack.extend(v for v in n.values() if isinstance(v, dict | list))
        elif isinstance(n, list):
            stack.extend(v for v in n if isinstance(v, dict | list))
    return out


def relation_names(node: Any) -> list[str]:
    """Every relation name in the tree: RangeVars and the qualified names a DROP lists."""
    out: list[str] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if "relname" in n and isinstance(n["relname"], str):
                out.append(n["relname"])
            objects = n.get("objects")
            if isinstance(objects, list):
                for obj in objects:
                    names = names_of(obj["List"].get("items", [])) if isinstance(obj, dict) and "List" in obj else []
                    if names:
                        out.append(names[-1])
            stack.extend(v for v in n.values() if isinstance(v, dict | list))
        elif isinstance(n, list):
            stack.extend(v for v in n if isinstance(v, dict | list))
    return out
