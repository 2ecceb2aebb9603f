"""The audit runtime without a keystore that answers: records are logged at once, kept for the keystore
(bounded, oldest dropped with a warning), each failed flush counted; anomaly events become the gauge, the
counter and one log line each. The "keystore" is a loopback port nothing listens on (a real refusal)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.audit_runtime import AuditRuntime
from proxy.config.types import AnomalyRule, AuditConfig
from proxy.devcluster import free_port

EMAIL = "public.customers.email"


async def refused_connection() -> Any:
    _, writer = await asyncio.open_connection("127.0.0.1", free_port())
    return writer  # never reached: nothing listens there


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def runtime(registry: CollectorRegistry, **config: Any) -> AuditRuntime:
    return AuditRuntime(
        AuditConfig(instance="unit", **config),
        [EMAIL],
        registry,
        connect=refused_connection,
        role_names=["support"],
    )


def test_unwritten_records_are_kept_bounded_and_every_failed_flush_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    rt = runtime(registry, max_pending_records=3)
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        for sid in range(1, 6):
            rt.session(sid, "sue").take({("support", EMAIL, "plaintext"): sid})
            await rt.flush()

    asyncio.run(scenario())
    assert sample(registry, "pgveil_audit_flush_errors_total") == 5
    assert [r.session_id for r in rt.pending] == [3, 4, 5]
    assert rt.dropped == 2
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pgveil.audit"]
    assert [(d["session"], d["count"], d["instance"], d["column"]) for d in lines] == [
        (sid, sid, "unit", EMAIL) for sid in range(1, 6)
    ]
    assert sum("were dropped" in r.getMessage() for r in caplog.records) == 2
    assert sample(registry, "pgveil_audit_values_read_total", role="support", column=EMAIL, outcome="plaintext") == 15


def test_an_unknown_role_label_is_exported_as_default() -> None:
    registry = CollectorRegistry()
    rt = runtime(registry)
    rt.session(1, "x").take({("gone", EMAIL, "masked"): 2})
    rt.tick()
    assert sample(registry, "pgveil_audit_values_read_total", role="default", column=EMAIL, outcome="masked") == 2


def test_an_anomaly_sets_the_gauge_counts_once_and_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    rule = AnomalyRule(role="support", column=EMAIL, plaintext_per_minute=60)  # 60 per 60 s
    rt = runtime(registry, anomaly=(rule,))
    labels = {"role": "support", "column": EMAIL}
    assert registry.get_sample_value("pgveil_audit_anomaly_active", labels) == 0  # exported from the start
    caplog.set_level(logging.INFO)
    s = rt.session(1, "sue")
    s.take({("support", EMAIL, "plaintext"): 61})
    s.take({("support", EMAIL, "plaintext"): 5})
    rt.tick()
    assert sample(registry, "pgveil_audit_anomaly_active", **labels) == 1
    assert sample(registry, "pgveil_audit_anomalies_total", **labels) == 1
    raised = [r.getMessage() for r in caplog.records if "access audit anomaly:" in r.getMessage()]
    assert len(raised) == 1
    assert "role support" in raised[0]
    assert EMAIL in raised[0]
    assert "60 per minute" in raised[0]
