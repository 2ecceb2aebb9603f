"""Turns run records into the result table: medians over rounds, ratios to the baseline, Markdown and JSON.

Pure: no I/O, no clocks. Throughput is the median of the rounds (robust to one disturbed round);
latency percentiles are over every transaction of every round; CPU per transaction is the middleman's
total CPU time over the total transactions.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.pgbench import percentile
from bench.workloads import Measurement, Workload


@dataclass(frozen=True, slots=True)
class RunRecord:
    workload: str
    target: str
    round: int
    measurement: Measurement | None
    elapsed_s: float
    cpu_s: float | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Row:
    workload: str
    target: str
    rounds: int
    tps: float | None
    tps_rounds: tuple[float, ...]
    rows_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    transactions: int
    failed: int
    ratio: float | None
    cpu_us_per_tx: float | None
    idle_kib_per_conn: float | None
    notes: tuple[str, ...] = field(default=())
    description: str = ""  # the workload's: what the row measures
    ratio_baseline: str = ""  # "workload on target" that ``ratio`` divides by


def _record_note(record: RunRecord) -> str:
    if record.error:
        return record.error
    return record.measurement.note if record.measurement is not None else ""


def _one_line(text: str) -> str:
    """A note fits a Markdown list item: the first line (what failed) and the last (usually why)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return text.strip()
    return f"{lines[0]} ... {lines[-1]}"


def _row(workload: Workload, target: str, records: Sequence[RunRecord]) -> Row:
    done = [r for r in records if r.measurement is not None]
    measurements = [r.measurement for r in done if r.measurement is not None]
    notes = [f"round {r.round}: {_one_line(_record_note(r))}" for r in records if _record_note(r)]
    tps_rounds = tuple(m.tps for m in measurements if m.tps is not None)
    tps = statistics.median(tps_rounds) if tps_rounds else None
    latencies = sorted(lat for m in measurements for lat in m.latencies_us)
    p50 = percentile(latencies, 0.50)
    p99 = percentile(latencies, 0.99)
    transactions = sum(m.transactions for m in measurements)
    cpu = [r.cpu_s for r in done if r.cpu_s is not None]
    cpu_us = sum(cpu) / transactions * 1e6 if cpu and transactions else None
    idle = [m.idle_kib_per_conn for m in measurements if m.idle_kib_per_conn is not None]
    return Row(
        workload=workload.name,
        target=target,
        rounds=len(done),
        tps=tps,
        tps_rounds=tps_rounds,
        rows_per_s=tps * workload.rows_per_tx if tps is not None and workload.rows_per_tx else None,
        p50_ms=p50 / 1000 if p50 is not None else None,
        p99_ms=p99 / 1000 if p99 is not None else None,
        transactions=transactions,
        failed=sum(m.failed for m in measurements),
        ratio=None,
        cpu_us_per_tx=cpu_us,
        idle_kib_per_conn=statistics.median(idle) if idle else None,
        notes=tuple(notes),
        description=workload.description,
        ratio_baseline="{} on {}".format(*workload.ratio_baseline),
    )


def aggregate(records: Sequence[RunRecord], workloads: Sequence[Workload], target_order: Sequence[str]) -> list[Row]:
    """One row per (workload, target) that ran, in registry order then ``target_order``."""
    rows: list[Row] = []
    for workload in workloads:
        for target in target_order:
            mine = [r for r in records if r.workload == workload.name and r.target == target]
            if mine:
                rows.append(_row(workload, target, mine))
    by_key = {(r.workload, r.target): r for r in rows}
    baselines = {w.name: w.ratio_baseline for w in workloads}
    out: list[Row] = []
    for row in rows:
        base = by_key.get(baselines[row.workload])
        ratio = None
        if base is not None and base.tps and row.tps is not None:
            ratio = row.tps / base.tps
        out.append(dataclasses.replace(row, ratio=ratio))
    return out


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if digits == 0 and abs(value) < 100:
        digits = 2
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "—"
    # Two significant digits for the pgcrypto rows, which are far below 0.1.
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def render_markdown(rows: Sequence[Row], meta: Mapping[str, str], skipped: Mapping[str, str]) -> str:
    lines = [f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        "",
        "| workload | target | tx/s | rows/s | p50 ms | p99 ms | failed | vs direct | CPU µs/tx | KiB/idle conn |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        cells = [
            r.workload,
            r.target,
            _num(r.tps) if r.tps is not None else "—",
            _num(r.rows_per_s) if r.rows_per_s is not None else "—",
            _num(r.p50_ms, 3) if r.p50_ms is not None else "—",
            _num(r.p99_ms, 3) if r.p99_ms is not None else "—",
            str(r.failed) if r.tps is not None else "—",
            _ratio(r.ratio),
            _num(r.cpu_us_per_tx, 1) if r.cpu_us_per_tx is not None else "—",
            _num(r.idle_kib_per_conn, 1) if r.idle_kib_per_conn is not None else "n/a",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    described: dict[str, Row] = {}
    for r in rows:
        described.setdefault(r.workload, r)
    lines += ["", "Workloads (vs direct divides by the named run):"]
    lines += [f"- {name}: {r.description}. Ratio over {r.ratio_baseline}." for name, r in described.items()]
    notes = [f"- {r.workload} / {r.target}: {n}" for r in rows for n in r.notes]
    notes += [f"- target {name} skipped: {_one_line(reason)}" for name, reason in skipped.items()]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def to_json(
    rows: Sequence[Row], records: Sequence[RunRecord], meta: Mapping[str, str], skipped: Mapping[str, str]
) -> dict[str, Any]:
    """Everything but the raw latencies, which are summarised by the rows."""
    runs = [
        {
            "workload": r.workload,
            "target": r.target,
            "round": r.round,
            "elapsed_s": r.elapsed_s,
            "cpu_s": r.cpu_s,
            "error": r.error,
            "transactions": r.measurement.transactions if r.measurement else None,
            "failed": r.measurement.failed if r.measurement else None,
            "tps": r.measurement.tps if r.measurement else None,
            "progress_tps": list(r.measurement.progress_tps) if r.measurement else [],
            "idle_kib_per_conn": r.measurement.idle_kib_per_conn if r.measurement else None,
            "note": r.measurement.note if r.measurement else "",
        }
        for r in records
    ]
    row_dicts = [
        {f: (list(v) if isinstance(v := getattr(row, f), tuple) else v) for f in Row.__dataclass_fields__}
        for row in rows
    ]
    return {"meta": dict(meta), "rows": row_dicts, "runs": runs, "skipped": dict(skipped)}
