"""The admin API's OpenAPI document against the running app: schemathesis generates calls for every
documented operation (with a token holding every scope) and checks each answer against the document
(status code documented, body and content type as described, server errors absent).

The document is fetched from the running ``pgveil serve`` itself (``/v1/openapi.json``), so what is
tested is what a client would read.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import schemathesis
import yaml
from conftest import ProxyProcess, wait_until
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok
from test_admin_api import _create_table, admin_config, insert_card

from proxy.admin.auth import Scope
from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

ROOT = "tok-schema-" + uuid.uuid4().hex


def _proxy(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, **config: Any) -> ProxyProcess:
    asyncio.run(_create_table(pg))
    workdir = tmp_path_factory.mktemp("admin-openapi")
    tokens = workdir / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            [{"name": "root", "sha256": hashlib.sha256(ROOT.encode()).hexdigest(), "scopes": [s.value for s in Scope]}]
        )
    )
    cfg = admin_config(pg, tokens, tmp_path_factory.getbasetemp() / "admin-api-master.key")
    return ProxyProcess({**cfg, **config}, workdir)


@pytest.fixture(scope="module")
def running(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proxy = _proxy(pg, tmp_path_factory)
    proxy.start()
    # A key version, so GET /v1/keys has a column with versions to describe.
    insert_card(proxy, 2, "5500000000000004")
    try:
        yield proxy
    finally:
        proxy.stop()


def fetch_document(proxy: ProxyProcess) -> dict[str, Any]:
    req = urllib.request.Request(proxy.admin_url + "/v1/openapi.json", headers={"Authorization": f"Bearer {ROOT}"})
    with urllib.request.urlopen(req, timeout=15) as r:
        doc: dict[str, Any] = json.loads(r.read())
    return doc


@pytest.fixture(scope="module")
def running_workers(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """The same with ``sessions.workers: 2``: sessions, terminations and the log level cross processes."""
    proxy = _proxy(pg, tmp_path_factory, sessions={"workers": 2, "shutdown_timeout": 5})
    proxy.start()
    try:
        assert wait_until(lambda: "worker 1 ready" in proxy.logs(), timeout=30), proxy.logs()
        yield proxy
    finally:
        proxy.stop()


def test_every_operation_answers_as_documented(running: ProxyProcess) -> None:
    conforms_to_its_document(running)


def test_every_operation_answers_as_documented_with_worker_processes(running_workers: ProxyProcess) -> None:
    # Sessions on both processes, so the listing has a worker's to describe (a generated DELETE may end
    # some: that is a documented answer too).
    insert_card(running_workers, 3, "4000000000000002")
    conns = [psycopg.connect(running_workers.dsn(), autocommit=True) for _ in range(4)]
    try:
        conforms_to_its_document(running_workers)
    finally:
        for c in conns:
            c.close()


def conforms_to_its_document(running: ProxyProcess) -> None:
    # schemathesis's own pytest plugin (from_fixture) does not run under this pytest; its strategies are
    # driven by hypothesis directly instead, one operation at a time.
    loaded = schemathesis.openapi.from_dict(fetch_document(running))
    tested = []
    for result in loaded.get_all_operations():
        assert isinstance(result, Ok), result  # an operation schemathesis cannot read is a broken document
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def conforms(case: Any) -> None:
            case.call_and_validate(base_url=running.admin_url, headers={"Authorization": f"Bearer {ROOT}"})

        conforms()
        tested.append(f"{operation.method.upper()} {operation.path}")
    assert "DELETE /v1/sessions/{id}" in tested
    assert "POST /v1/policy/reload" in tested
    assert "POST /v1/policy/explain" in tested  # offered: this pgveil governs a column
    assert len(tested) == 11


def test_the_document_is_valid_openapi_3_1(running: ProxyProcess) -> None:
    doc = fetch_document(running)
    assert doc["openapi"] == "3.1.0"
    # schemathesis refuses a document that is not OpenAPI (and validates it on loading).
    loaded = schemathesis.openapi.from_dict(doc)
    results = list(loaded.get_all_operations())
    assert all(isinstance(r, Ok) for r in results)
    operations = {(r.ok().method.upper(), r.ok().path) for r in results if isinstance(r, Ok)}
    assert ("DELETE", "/v1/sessions/{id}") in operations
    assert len(operations) == sum(len(ops) for ops in doc["paths"].values())


def test_the_served_document_is_the_generated_one(running: ProxyProcess, tmp_path: Path) -> None:
    from proxy.admin.api import operations
    from proxy.admin.openapi import build_document

    assert fetch_document(running) == json.loads(json.dumps(build_document(operations(explain=True))))
