"""Which implementation runs: PGVEIL_IMPL is honoured at import, and what runs is shown by
``pgveil --version`` and the build_info metric. Each case runs in a fresh interpreter, since the choice
is made once per process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from keymgmt import native

# Whether the accelerator is built, whatever this process chose (the suite may run with PGVEIL_IMPL=python).
BUILT = importlib.util.find_spec(native.MODULE) is not None

PROBE = (
    "import keymgmt.native as n, keymgmt.envelope as e, proxy.encrypt.rows as r;"
    "k = e.DataKey.from_material(b'k'*16, b'm'*32);"
    "print(n.IMPLEMENTATION, e._accel is None, r._accel is None, type(k._cipher).__name__)"
)


def run(code: str, impl: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PGVEIL_IMPL"}
    if impl is not None:
        env["PGVEIL_IMPL"] = impl
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_python_is_forced_by_the_environment() -> None:
    p = run(PROBE, "python")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["python", "True", "True", "AESGCM"]


def test_default_picks_the_accelerator_when_it_is_built() -> None:
    p = run(PROBE, None)
    assert p.returncode == 0, p.stderr
    if not BUILT:
        assert p.stdout.split() == ["python", "True", "True", "AESGCM"]
    else:
        assert p.stdout.split() == ["native", "False", "False", "Key"]


def test_an_unknown_value_is_an_error_not_a_silent_choice() -> None:
    p = run(PROBE, "fast")
    assert p.returncode != 0
    assert "PGVEIL_IMPL must be" in p.stderr


@pytest.mark.skipif(BUILT, reason="the accelerator is built here")
def test_native_demanded_but_missing_is_an_error() -> None:
    p = run(PROBE, "native")
    assert p.returncode != 0
    assert "PGVEIL_IMPL=native" in p.stderr


@pytest.mark.parametrize("impl", ["python", None])
def test_version_and_build_info_name_the_implementation(impl: str | None) -> None:
    code = (
        "import sys; from proxy.cli import main; from proxy.admin.metrics import Metrics;"
        "from prometheus_client import generate_latest;"
        "print([l for l in generate_latest(Metrics('1').registry).decode().splitlines()"
        " if l.startswith('pgveil_build_info')][0]); sys.argv = ['pgveil', '--version']; main()"
    )
    p = run(code, impl)
    expected = "python" if impl == "python" or not BUILT else "native"
    assert f'implementation="{expected}"' in p.stdout, p.stdout + p.stderr
    assert f"kernels: {expected} (" in p.stdout, p.stdout + p.stderr
