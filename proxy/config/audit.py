"""The ``audit:`` section: the access audit's settings and its anomaly rules, validated against the
governed tables and the ``roles:`` section.

An anomaly rule names a role of ``roles:`` (``default`` included) and a column pattern as ``roles:``
writes them (``schema.table.column``, ``schema.table.*``, ``schema.*``, ``*``) that covers at least one
governed column: a typo would otherwise watch nothing, silently. Every problem is reported with its
dotted path, e.g. ``audit.anomaly[0].role: 'suport' is not a role of the roles: section (did you mean
'support'?)``.

Must not: read files or the environment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

from proxy.config.roles import show_value, suggestion
from proxy.config.types import AnomalyRule, AuditConfig, TableConfig
from proxy.policy.rules import DEFAULT_KEY, parse_pattern

_SECTION_KEYS: Final = ("enabled", "flush_seconds", "window_seconds", "instance", "max_pending_records", "anomaly")
_RULE_KEYS: Final = ("role", "column", "plaintext_per_minute", "refuse")


def parse_audit(
    data: Any, tables: tuple[TableConfig, ...], role_names: frozenset[str]
) -> tuple[AuditConfig, list[str]]:
    """The section (defaults where absent) and one error line per problem."""
    errors: list[str] = []
    d = AuditConfig()
    if data is None:
        return d, errors
    if not isinstance(data, Mapping):
        return d, [f"audit: must be a mapping, got {show_value(data)}"]
    for key in data:
        if key not in _SECTION_KEYS:
            hint = suggestion(key, _SECTION_KEYS) if isinstance(key, str) else ""
            errors.append(f"audit.{key}: unknown setting{hint}")

    def number(key: str, default: float, *, integer: bool = False, lo: float = 0.0) -> Any:
        if key not in data:
            return default
        v = data[key]
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > lo
        if integer:
            ok = ok and v == int(v)  # 1.0 is an integer, as JSON Schema counts
        if not ok:
            what = "an integer >= 1" if integer else "a number of seconds > 0"
            errors.append(f"audit.{key}: must be {what}, got {show_value(v)}")
            return default
        return int(v) if integer else float(v)

    enabled = data.get("enabled", d.enabled)
    if not isinstance(enabled, bool):
        errors.append(f"audit.enabled: must be true or false, got {show_value(enabled)}")
        enabled = d.enabled
    instance = data.get("instance", d.instance)
    if instance is not None and not (isinstance(instance, str) and instance.strip() and len(instance) <= 200):
        errors.append(
            f"audit.instance: must be a non-empty string of at most 200 characters, got {show_value(instance)}"
        )
        instance = d.instance
    column_ids = [f"{t.schema}.{t.name}.{c.name}" for t in tables for c in t.columns]
    return (
        AuditConfig(
            enabled=enabled,
            flush_seconds=number("flush_seconds", d.flush_seconds),
            window_seconds=number("window_seconds", d.window_seconds),
            instance=instance,
            max_pending_records=number("max_pending_records", d.max_pending_records, integer=True),
            anomaly=_rules(data.get("anomaly"), column_ids, role_names, errors),
        ),
        errors,
    )


def _rules(v: Any, column_ids: list[str], role_names: frozenset[str], errors: list[str]) -> tuple[AnomalyRule, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        errors.append(f"audit.anomaly: must be a list of rules like {{role: support, column: public.t.c, "
                      f"plaintext_per_minute: 100}}, got {show_value(v)}")  # fmt: skip
        return ()
    roles = sorted(role_names | {DEFAULT_KEY})
    out: list[AnomalyRule] = []
    seen: set[tuple[str, str]] = set()
    for i, spec in enumerate(v):
        p = f"audit.anomaly[{i}]"
        if not isinstance(spec, Mapping):
            errors.append(f"{p}: must be a mapping with role, column and plaintext_per_minute, got {show_value(spec)}")
            continue
        bad = False
        for key in spec:
            if key not in _RULE_KEYS:
                hint = suggestion(key, _RULE_KEYS) if isinstance(key, str) else ""
                errors.append(f"{p}.{key}: unknown setting{hint}")
        for key in ("role", "column", "plaintext_per_minute"):
            if key not in spec:
                errors.append(f"{p}.{key}: required")
                bad = True
        role = spec.get("role")
        if "role" in spec and (not isinstance(role, str) or role not in roles):
            hint = suggestion(role, roles) if isinstance(role, str) else ""
            errors.append(f"{p}.role: {show_value(role)} is not a role of the roles: section{hint}")
            bad = True
        column = spec.get("column")
        text = ""
        if "column" in spec:
            try:
                if not isinstance(column, str):
                    raise ValueError(f"must be a column pattern, got {show_value(column)}")
                pattern = parse_pattern(column)
                text = str(pattern)
                if not any(pattern.covers(c) for c in column_ids):
                    raise ValueError(f"{text!r} names no column of the tables: section")
            except ValueError as e:
                errors.append(f"{p}.column: {e}")
                bad = True
        limit = spec.get("plaintext_per_minute")
        if "plaintext_per_minute" in spec:
            if (
                isinstance(limit, int | float)
                and not isinstance(limit, bool)
                and 0 <= limit < 2**63
                and limit == int(limit)
            ):
                limit = int(limit)  # 100.0 is an integer, as JSON Schema counts
            else:
                errors.append(f"{p}.plaintext_per_minute: must be an integer >= 0, got {show_value(limit)}")
                bad = True
        refuse = spec.get("refuse", False)
        if not isinstance(refuse, bool):
            errors.append(f"{p}.refuse: must be true or false, got {show_value(refuse)}")
            bad = True
        if bad:
            continue
        assert isinstance(role, str)
        assert isinstance(limit, int)
        if (role, text) in seen:
            errors.append(f"{p}: role {role} has another rule for {text}")
            continue
        seen.add((role, text))
        out.append(AnomalyRule(role=role, column=text, plaintext_per_minute=limit, refuse=refuse))
    return tuple(out)
