"""``pgveil demo`` end to end, as a newcomer runs it: it starts its own PostgreSQL, puts pgveil in front,
and its tour shows what the issue promises. The assertions read the tour's output: four people get four
different answers to the same ``SELECT *``, a support agent's search by SSN is refused with the reason,
the stored ciphertext differs row by row even for equal values, and the tour speaks of people and rows,
never of protocol messages.

Ctrl-C and SIGTERM end the demo alike: nothing it started survives it (no server process, no temporary
directory). ``--config`` is honoured, or refused with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SSNS = ("123-45-6789", "987-65-4321", "555-12-3456")
PROTOCOL_WORDS = ("RowDescription", "DataRow", "ErrorResponse", "ReadyForQuery", "ParameterStatus", "codec")


@pytest.fixture
def demo_tmp() -> Iterator[Path]:
    """The demo's TMPDIR: its own, so that what the demo leaves behind can be seen (world-traversable,
    since the cluster runs as another OS user when the tests run as root)."""
    path = Path(tempfile.mkdtemp(prefix="pgveil-demo-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def demo_env(tmp: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return env


def run_demo(*args: str, tmp: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd or tmp or REPO,
        env=demo_env(tmp),
    )


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory) -> str:
    done = run_demo(cwd=tmp_path_factory.mktemp("demo"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout


def section(tour: str, login: str) -> str:
    """The part of the tour that shows what ``login`` got for ``SELECT * FROM customers``."""
    m = re.search(rf"\(logs in as {login}\):\n(.*?)(?:\n\n|\Z)", tour, re.S)
    assert m is not None, tour
    return m.group(1)


def column_cells(table: str, column: str) -> list[str]:
    lines = [line for line in table.splitlines() if "|" in line]
    header = [c.strip() for c in lines[0].split("|")]
    i = header.index(column)
    return [[c.strip() for c in line.split("|")][i] for line in lines[1:]]  # the separator has no "|"


def direct_table(tour: str) -> str:
    part = tour.split("what anyone reading PostgreSQL directly sees")[1].split("\n== ")[0]
    return "\n".join(line for line in part.splitlines() if "|" in line or set(line.strip()) <= {"-", "+"})


def test_four_people_get_four_different_answers(tour: str) -> None:
    answers = {login: section(tour, login) for login in ("bill", "sue", "carl", "ivan")}
    assert len(set(answers.values())) == 4
    billing = column_cells(answers["bill"], "ssn")
    assert set(SSNS) <= set(billing)
    support = column_cells(answers["sue"], "ssn")
    assert len(support) == len(billing)
    assert not any(s in answers["sue"] for s in SSNS)
    # last4: the last four digits of each SSN survive; nothing before them does.
    assert [s[-4:] for s in support if s != "NULL"] == [s[-4:] for s in billing if s != "NULL"]
    assert re.search(
        r"refused: permission denied for column public\.customers\.\w+: .* \(SQLSTATE 42501\)", answers["carl"]
    )
    assert not any(s in answers["carl"] for s in SSNS)
    intern = column_cells(answers["ivan"], "ssn")
    assert intern
    assert set(intern) == {"NULL"}
    assert "Ada Lovelace" in answers["ivan"]  # not governed: the rows themselves still come


def test_a_support_agents_search_by_ssn_is_refused_with_the_reason(tour: str) -> None:
    m = re.search(r"SELECT name FROM customers WHERE ssn LIKE '1%'\n\s+-> (.*)", tour)
    assert m is not None, tour
    assert m.group(1).startswith("refused: ")
    assert "public.customers.ssn" in m.group(1)
    m = re.search(r"SELECT name FROM customers ORDER BY phone\n\s+-> (.*)", tour)
    assert m is not None, tour
    assert m.group(1).startswith("refused: permission denied for column public.customers.phone")
    assert m.group(1).endswith("(SQLSTATE 42501)")
    assert "billing may sort by phone" in tour


def test_the_stored_ciphertext_differs_row_by_row(tour: str) -> None:
    table = direct_table(tour)
    for column in ("email", "ssn", "birth_date"):
        cells = [c for c in column_cells(table, column) if c != "NULL"]
        assert len(cells) >= 4, table
        assert all(re.fullmatch(r"\d+ bytes …[0-9a-f]{16}", c) for c in cells), cells
        tails = [c.split("…")[1] for c in cells]
        assert len(set(tails)) == len(tails)  # rows 1 and 4 hold the same person's values
    assert not any(s in table for s in SSNS)
    assert "+44 20 7946 0018" in table  # phone is plain in the database


def test_the_tour_speaks_the_users_language(tour: str) -> None:
    for word in PROTOCOL_WORDS:
        assert word not in tour
    codes = 0
    for line in tour.splitlines():
        # A SQLSTATE is shown only after the sentence it codes, in parentheses, never as a line's subject.
        assert not re.search(r"(->|refused,|:)\s*[0-9][0-9A-Z]{4}\b[:,]?\s", line), line
        for m in re.finditer(r"SQLSTATE", line):
            codes += 1
            assert re.match(r"SQLSTATE [0-9A-Z]{5}\)", line[m.start() :]), line
            assert line[m.start() - 1] == "(", line
            assert len(line[: m.start()].split()) >= 4, line
    assert codes >= 5


# -- signals: nothing left behind ----------------------------------------------------------------------


def leftovers(tmp: Path) -> tuple[list[str], list[str]]:
    """The directories left in the demo's TMPDIR and the processes whose command line names it."""
    dirs = sorted(p.name for p in tmp.iterdir())
    procs = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(tmp) in cmdline:
            procs.append(f"{proc.name}: {cmdline}")
    return dirs, procs


def interrupted_demo(tmp: Path, sig: int, until: str, *args: str) -> tuple[int, str, str]:
    """Runs the demo, sends ``sig`` once ``until`` appears in its output, returns (code, out, err)."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "proxy.cli", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp,
        env=demo_env(tmp),
    )
    assert proc.stdout is not None
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if until in line:
                proc.send_signal(sig)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(seen) + out, err


@pytest.mark.parametrize(
    ("sig", "name", "until", "args"),
    [
        (signal.SIGTERM, "SIGTERM", "running until Ctrl-C", ("--keep-running",)),
        (signal.SIGTERM, "SIGTERM", "starting a throwaway PostgreSQL", ()),
        (signal.SIGTERM, "SIGTERM", "pgveil is in front of it", ()),
        (signal.SIGINT, "interrupted", "running until Ctrl-C", ("--keep-running",)),
    ],
    ids=["sigterm-kept-running", "sigterm-starting", "sigterm-mid-tour", "ctrl-c-kept-running"],
)
def test_a_signal_stops_the_demo_and_leaves_nothing_behind(
    demo_tmp: Path, sig: int, name: str, until: str, args: tuple[str, ...]
) -> None:
    code, out, err = interrupted_demo(demo_tmp, sig, until, *args)
    assert "Traceback" not in err, err
    assert code == 130, out + err
    assert f"stopped ({name}): the cluster, its keystore and the demo master key are gone" in out
    assert leftovers(demo_tmp) == ([], []), out + err


# -- --config ------------------------------------------------------------------------------------------


def test_config_is_honoured(demo_tmp: Path) -> None:
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["tables"]["public.customers"]["columns"]["ssn"] = {"type": "text"}  # plain now
    config["roles"]["support"]["public.customers.ssn"] = "plaintext"
    path = demo_tmp / "my-demo.yaml"
    path.write_text(yaml.safe_dump(config))
    done = run_demo("--config", str(path), tmp=demo_tmp)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"with the tables and roles of {path}" in done.stdout
    assert set(SSNS) <= set(column_cells(section(done.stdout, "sue"), "ssn"))  # the file's roles
    assert set(SSNS) <= set(column_cells(direct_table(done.stdout), "ssn"))  # the file's tables: ssn plain
    assert re.search(r"^  [\w, ]*\bssn\b[\w, ]*: not encrypted", done.stdout, re.M)
    assert "the demo sets listen, upstream, admin, keystore itself" in done.stdout
    assert leftovers(demo_tmp) == ([path.name], [])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("tables: [1, 2", "demo --config"),
        ("- a list", "not a configuration"),
        ("tables: {public.orders: {columns: {total: {type: numeric}}}}", "the demo creates only public.customers"),
        ("tables: {public.customers: {columns: {iban: {type: text}}}}", "it has no iban"),
        ("tables: {public.customers: {columns: {ssn: {type: nope}}}}", "public.customers"),
    ],
    ids=["missing", "not-yaml", "not-a-mapping", "other-table", "other-column", "invalid"],
)
def test_config_the_demo_cannot_honour_is_refused(demo_tmp: Path, content: str | None, message: str) -> None:
    path = demo_tmp / "bad.yaml"
    if content is not None:
        path.write_text(content)
    done = run_demo("--config", str(path), tmp=demo_tmp)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("pgveil: ")
    assert message in done.stderr
    assert [p for p in demo_tmp.iterdir() if p.name != "bad.yaml"] == []
