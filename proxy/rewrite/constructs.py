"""How the analysis names SQL constructs in refusal messages, and the output names PostgreSQL gives
unnamed SELECT-list entries.

Must not: resolve names or decide what is refused.
"""

from __future__ import annotations

from proxy.rewrite.literals import NotAValue, type_name_text
from proxy.rewrite.nodes import Node, column_fields, last_name, names_of, node_type

AGGREGATES = frozenset(
    {
        "sum", "avg", "min", "max", "array_agg", "string_agg", "json_agg", "jsonb_agg", "json_object_agg",
        "jsonb_object_agg", "xmlagg", "bool_and", "bool_or", "every", "bit_and", "bit_or", "bit_xor",
        "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp", "mode",
        "percentile_cont", "percentile_disc", "count", "any_value", "range_agg", "range_intersect_agg",
    }
)  # fmt: skip

# Functions that run SQL given as a string on the server, or dump a table, cursor, schema or database
# named by a string: their output holds whatever those columns hold, which pgveil cannot attribute.
SQL_TEXT_FUNCTIONS = frozenset(
    {
        "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema",
        "table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema",
        "cursor_to_xml", "cursor_to_xmlschema",
        "schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema",
        "database_to_xml", "database_to_xmlschema", "database_to_xml_and_xmlschema",
        "dblink", "dblink_exec", "dblink_open", "dblink_send_query",
        "ts_stat", "ts_rewrite",  # ts_stat(sqlquery text), ts_rewrite(query tsquery, select text)
        "crosstab", "crosstab2", "crosstab3", "crosstab4", "connectby",  # contrib tablefunc
    }
)  # fmt: skip
# Of those, the ones whose string does not name the tables they read (a cursor's name, a schema, none).
WHOLE_DATABASE_FUNCTIONS = frozenset(
    {
        "cursor_to_xml", "cursor_to_xmlschema",
        "schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema",
        "database_to_xml", "database_to_xmlschema", "database_to_xml_and_xmlschema",
    }
)  # fmt: skip

NODE_CONSTRUCTS = {
    "CaseExpr": "CASE",
    "CaseWhen": "CASE",
    "CoalesceExpr": "COALESCE",
    "RowExpr": "row constructor",
    "A_ArrayExpr": "ARRAY constructor",
    "A_Indirection": "subscript or field selection",
    "CollateClause": "COLLATE",
    "GroupingFunc": "GROUPING()",
    "XmlExpr": "XML function",
    "XmlSerialize": "XMLSERIALIZE",
    "MultiAssignRef": "multiple-column assignment",
    "RangeTableSample": "TABLESAMPLE",
    "RangeTableFunc": "XMLTABLE",
    "JsonTable": "JSON_TABLE",
}

_OP_LIKE = {
    "~~": "LIKE",
    "!~~": "NOT LIKE",
    "~~*": "ILIKE",
    "!~~*": "NOT ILIKE",
    "~": "SIMILAR TO",
    "!~": "NOT SIMILAR TO",
}
_BETWEEN = {
    "AEXPR_BETWEEN": "BETWEEN",
    "AEXPR_NOT_BETWEEN": "NOT BETWEEN",
    "AEXPR_BETWEEN_SYM": "BETWEEN SYMMETRIC",
    "AEXPR_NOT_BETWEEN_SYM": "NOT BETWEEN SYMMETRIC",
}


def operator_construct(kind: str, op: str, binary: bool) -> tuple[str, bool]:
    """The construct an A_Expr is called in messages, and whether it is an equality test."""
    if kind == "AEXPR_OP":
        if not binary:
            return f"operator {op}", False
        if op == "=":
            return "= comparison", True
        if op in ("<>", "!="):
            return "<> comparison", False
        if op in ("<", ">", "<=", ">="):
            return f"{op} comparison", False
        return f"operator {op}", False
    if kind == "AEXPR_OP_ANY":
        return f"{op} ANY", op == "="
    if kind == "AEXPR_OP_ALL":
        return f"{op} ALL", False
    if kind == "AEXPR_IN":
        return ("IN", True) if op == "=" else ("NOT IN", False)
    if kind in ("AEXPR_LIKE", "AEXPR_ILIKE", "AEXPR_SIMILAR"):
        return _OP_LIKE.get(op, kind.removeprefix("AEXPR_")), False
    if kind in _BETWEEN:
        return _BETWEEN[kind], False
    if kind == "AEXPR_DISTINCT":
        return "IS DISTINCT FROM", False
    if kind == "AEXPR_NOT_DISTINCT":
        return "IS NOT DISTINCT FROM", False
    if kind == "AEXPR_NULLIF":
        return "NULLIF", False
    return f"operator {op}", False


def figure_name(node: Node) -> str | None:
    """The output column name PostgreSQL gives an unnamed SELECT-list entry (FigureColname), as far as
    the analysis needs it: to find the column when an outer query refers to it by name."""
    kind, body = node_type(node)
    if kind == "ColumnRef":
        names, _star = column_fields(body)
        return names[-1] if names else None
    if kind == "FuncCall":
        return last_name(body.get("funcname", [])) or None
    if kind == "TypeCast":
        inner = figure_name(body.get("arg", {}))
        if inner is not None:
            return inner
        return type_name_text(body.get("typeName", {})).split(".")[-1].split("(")[0] or None
    if kind == "A_Indirection":
        names = names_of(body.get("indirection", []))
        return names[-1] if names else figure_name(body.get("arg", {}))
    fixed = {"CaseExpr": "case", "A_ArrayExpr": "array", "RowExpr": "row", "CoalesceExpr": "coalesce"}
    if kind in fixed:
        return fixed[kind]
    if kind == "MinMaxExpr":
        return "greatest" if body.get("op") == "IS_GREATEST" else "least"
    return None


def describe_value(node: Node, value: NotAValue) -> str:
    """What a refused value is, without its contents."""
    if value.what != "expression":
        return f"a {value.what}"
    kind, body = node_type(node)
    if kind == "ColumnRef":
        return f"column reference {'.'.join(column_fields(body)[0])}"
    if kind == "FuncCall":
        return f"function {last_name(body.get('funcname', []))}()"
    if kind == "SubLink":
        return "a subquery"
    return "an expression"
