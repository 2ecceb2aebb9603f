"""SQL analysis off the event loop: what runs in the analysis worker process, and how plans cross to it.

Analysing a statement costs about a quarter of a millisecond per kilobyte of SQL (libpg_query releases the
GIL, but turning its parse tree into a plan is Python), so a multi-megabyte statement would stop every
session of the process for seconds. :class:`~proxy.encrypt.engine.CryptoContext` analyses short statements
inline and hands longer ones to the session (:class:`~proxy.protocol.encryption.AnalysisMiss`), which runs
:func:`analyze_detached` in a worker process and resumes the held client once the plan is back. Nothing
here touches keys: the worker sees the statement text and the catalog of protected tables only.
"""

from __future__ import annotations

import copyreg
import types
from typing import Any

from proxy.errors import FeatureNotSupported
from proxy.rewrite.analysis import analyze, needs_analysis
from proxy.rewrite.catalog import Catalog
from proxy.rewrite.plan import QueryPlan
from proxy.rewrite.reading import reading_refusal


def _mapping_proxy(items: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(items)


def _reduce_mapping_proxy(proxy: types.MappingProxyType[Any, Any]) -> tuple[Any, tuple[dict[Any, Any]]]:
    return _mapping_proxy, (dict(proxy),)


# Plans hold read-only mappings; pickle them as the dicts they wrap (registered in both processes, since
# both import this module).
copyreg.pickle(types.MappingProxyType, _reduce_mapping_proxy)


# What analyze_detached answers for a statement over the limit that may name a protected table.
TOO_LARGE = "too large"


def analyze_detached(sql: str, catalog: Catalog, limit: int) -> QueryPlan | str:
    """:func:`proxy.rewrite.analysis.analyze`, run in the analysis worker process; :data:`TOO_LARGE`
    instead for a statement longer than ``limit`` that may name a protected table."""
    if len(sql) > limit and needs_analysis(sql, catalog):
        return TOO_LARGE
    return analyze(sql, catalog)


def read_detached(
    sql: str, standard_conforming_strings: bool, client_encoding: str, certain: bool, limit: int
) -> tuple[str, FeatureNotSupported | None]:
    """:func:`proxy.rewrite.reading.reading_refusal` (whose lexer is Python too), run in the analysis
    worker process; tagged, so that a refusal is told apart from a failure of the worker.
    :data:`TOO_LARGE` for a statement longer than ``limit`` that the check would have to lex (it lexes
    only text with a backslash or a U& string, or non-ASCII text while the settings are uncertain)."""
    may_lex = "\\" in sql or "&'" in sql or (not certain and not sql.isascii())
    if len(sql) > limit and may_lex:
        return (TOO_LARGE, None)
    refusal = reading_refusal(
        sql, standard_conforming_strings=standard_conforming_strings, client_encoding=client_encoding, certain=certain
    )
    return ("read", refusal)
