"""COPY options as the statement gives them, from the ``WITH (...)`` list or the pre-9.0 syntax.

Must not: validate the options (the server does, and the row rewriter checks what it relies on).
"""

from __future__ import annotations

from proxy.rewrite.nodes import Node, names_of, string_value
from proxy.rewrite.plan import CopyFormat, CopyOptions


def parse_copy_options(defelems: list[Node]) -> tuple[CopyFormat, CopyOptions]:
    """COPY options, from both the ``WITH (...)`` list and the pre-9.0 syntax (libpg_query turns
    ``CSV HEADER DELIMITER ','`` into the same DefElems)."""
    fmt = CopyFormat.TEXT
    strings: dict[str, str | None] = {}
    header = header_match = force_quote_all = False
    lists: dict[str, tuple[str, ...]] = {}
    for item in defelems:
        d = item.get("DefElem", {})
        name = str(d.get("defname", ""))
        arg = d.get("arg")
        if name == "format":
            value = (string_value(arg) or "text").lower()
            fmt = CopyFormat(value) if value in {f.value for f in CopyFormat} else CopyFormat.TEXT
        elif name in ("delimiter", "null", "quote", "escape", "encoding"):
            strings[name] = string_value(arg)
        elif name == "header":
            value = (string_value(arg) or "true").lower()
            header_match = value == "match"
            header = header_match or value in ("true", "on", "1")
        elif name in ("force_quote", "force_not_null", "force_null"):
            if arg is not None and "A_Star" in arg:
                force_quote_all = force_quote_all or name == "force_quote"
            elif arg is not None:
                lists[name] = tuple(names_of(arg.get("List", {}).get("items", [])))
    options = CopyOptions(
        delimiter=strings.get("delimiter"),
        null=strings.get("null"),
        quote=strings.get("quote"),
        escape=strings.get("escape"),
        header=header,
        header_match=header_match,
        encoding=strings.get("encoding"),
        force_quote=lists.get("force_quote", ()),
        force_quote_all=force_quote_all,
        force_not_null=lists.get("force_not_null", ()),
        force_null=lists.get("force_null", ()),
    )
    return fmt, options
