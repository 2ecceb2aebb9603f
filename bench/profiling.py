"""Where a pgveil process spends its CPU during a workload: py-spy samples, summarised per function.

py-spy (``pip install py-spy``; not a project dependency) attaches to the running proxy from outside,
so the proxy runs unmodified and nearly at full speed, unlike under cProfile, whose per-call overhead
inflates exactly the small functions a proxy's hot path is made of. It records collapsed stacks
(``--format raw``: ``frame;frame;...;leaf count`` per line, a frame being ``function (file:line)``),
with idle samples left out, so the share of samples approximates the share of the process's CPU time.
Without ``--native`` the time spent in C and Rust code (AES-GCM in ``cryptography``, ``bytes.fromhex``,
uvloop's transport writes) is charged to the Python function that called it. py-spy counts a thread
blocked in ``epoll_wait`` as busy: without ``--native`` that wait is charged to the event loop's run
function (``Runner.run`` under uvloop); with ``--native`` it shows as its own leaf, and :func:`summarise`
leaves those samples out of the shares (and counts them apart), so the shares are of real CPU time.

Owns the py-spy command line and the parsing and summary of its output; parsing and summarising are
pure. It must not start or stop the proxy, nor run workloads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.pgbench import BenchError

log = logging.getLogger(__name__)

DEFAULT_RATE_HZ = 200
TOP_N = 25
STOP_TIMEOUT_S = 30.0

Stack = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FunctionShare:
    frame: str  # ``function (file:line)`` as py-spy names it, the path shortened
    self_samples: int
    inclusive_samples: int


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    samples: int
    functions: tuple[FunctionShare, ...]  # every function that appears, by self samples, descending
    areas: tuple[tuple[str, int], ...]  # (area, self samples), descending
    idle_samples: int = 0  # blocked in the event loop's poll (native frames only), not in ``samples``


# Native leaves in which a thread waits for I/O rather than runs: py-spy samples them as busy.
IDLE_NATIVE_LEAVES = frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6"})


def is_idle_leaf(frame: str) -> bool:
    """A native wait (``epoll_pwait (/usr/lib/…/libc.so.6)``); never a Python function of that name."""
    name, _, location = frame.partition(" (")
    return name in IDLE_NATIVE_LEAVES and ".py:" not in location


def find_py_spy() -> Path | None:
    """The ``py-spy`` beside our interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return local
    found = shutil.which("py-spy")
    return Path(found) if found else None


@contextlib.contextmanager
def py_spy_record(
    pid: int, output: Path, *, rate: int = DEFAULT_RATE_HZ, native: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    """Samples ``pid`` while the block runs; on exit stops py-spy with SIGINT, upon which it writes
    ``output``. Raises :class:`BenchError` when py-spy is missing or cannot attach."""
    binary = find_py_spy()
    if binary is None:
        raise BenchError("py-spy not found beside the interpreter or on PATH (.venv/bin/pip install py-spy)")
    argv = [
        str(binary),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--function",
        "--full-filenames",
    ]
    argv += ["--output", str(output), *(["--native"] if native else [])]
    log_path = output.with_suffix(".log")
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if not output.exists() or output.stat().st_size == 0:
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-5:])
        raise BenchError(f"py-spy wrote no samples (exit {proc.returncode}):\n{tail or '(no output)'}")


def parse_collapsed(text: str) -> Counter[Stack]:
    """``frame;frame;...;leaf count`` lines to sample counts per stack (root first)."""
    stacks: Counter[Stack] = Counter()
    for line in text.splitlines():
        head, sep, count = line.rstrip().rpartition(" ")
        if not sep or not count.isdigit() or not head:
            continue
        stacks[tuple(head.split(";"))] += int(count)
    return stacks


def shorten(frame: str, roots: Sequence[str] = ()) -> str:
    """``f (/abs/…/site-packages/pkg/mod.py:12)`` -> ``f (pkg/mod.py:12)``; the same for the repository
    (``roots``) and the standard library."""
    name, sep, location = frame.partition(" (")
    if not sep:
        return frame
    path = location.rstrip(")")
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            return f"{name} ({path.split(marker, 1)[1]})"
    for root in roots:
        prefix = root.rstrip("/") + "/"
        if path.startswith(prefix):
            return f"{name} ({path[len(prefix) :]})"
    stdlib = f"/lib/python{sys.version_info.major}.{sys.version_info.minor}/"
    if stdlib in path:
        return f"{name} (stdlib/{path.split(stdlib, 1)[1]})"
    return f"{name} ({path})"


def area(frame: str) -> str:
    """What a shortened frame belongs to: a repository package (``proxy/encrypt``), a third-party
    package (``cryptography``), a standard-library module (``stdlib/asyncio``), or, for native frames
    outside those (``--native``), the file (``native libc.so.6``)."""
    _, sep, location = frame.partition(" (")
    if not sep:
        return frame
    path = location.rstrip(")").rsplit(":", 1)[0]
    if path.startswith("/") or path.startswith("["):
        return f"native {path.rsplit('/', 1)[-1]}"
    parts = path.split("/")
    if parts[0] == "stdlib":
        return "/".join(parts[:2]).removesuffix(".py")
    if len(parts) >= 3 and parts[0] in ("proxy", "keymgmt", "bench"):
        return "/".join(parts[:2])
    return parts[0].removesuffix(".py")


def summarise(stacks: Mapping[Stack, int], roots: Sequence[str] = ()) -> ProfileSummary:
    """Self samples (the function was running) and inclusive samples (it was on the stack, counted
    once per sample even when recursive) per function."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    idle = 0
    for stack, count in stacks.items():
        if not stack:
            continue
        if is_idle_leaf(stack[-1]):
            idle += count
            continue
        frames = [shorten(f, roots) for f in stack]
        total += count
        self_counts[frames[-1]] += count
        areas[area(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    functions = sorted(
        (FunctionShare(f, self_counts[f], inclusive[f]) for f in inclusive),
        key=lambda s: (-s.self_samples, -s.inclusive_samples, s.frame),
    )
    return ProfileSummary(
        samples=total,
        functions=tuple(functions),
        areas=tuple(sorted(areas.items(), key=lambda kv: (-kv[1], kv[0]))),
        idle_samples=idle,
    )


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "  n/a"


def render_profile(summary: ProfileSummary, meta: Mapping[str, str], top: int = TOP_N) -> str:
    """Markdown: the top functions by self time, the top by inclusive time, and self time per area."""
    n = summary.samples
    lines = [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", f"Top {top} functions by self time (share of the proxy's sampled CPU):", ""]
    lines += ["| self | incl | function (file:first line) |", "|--:|--:|---|"]
    for s in summary.functions[:top]:
        lines.append(f"| {_pct(s.self_samples, n)} | {_pct(s.inclusive_samples, n)} | `{s.frame}` |")
    by_inclusive = sorted(summary.functions, key=lambda s: (-s.inclusive_samples, s.frame))
    lines += ["", f"Top {top} functions by inclusive time (itself and what it calls):", ""]
    lines += ["| incl | self | function (file:first line) |", "|--:|--:|---|"]
    for s in by_inclusive[:top]:
        lines.append(f"| {_pct(s.inclusive_samples, n)} | {_pct(s.self_samples, n)} | `{s.frame}` |")
    lines += ["", "Self time per area:", "", "| self | area |", "|--:|---|"]
    lines += [f"| {_pct(count, n)} | {name} |" for name, count in summary.areas]
    return "\n".join(lines) + "\n"


def repository_roots() -> list[str]:
    """Absolute paths under which frames are shown relative: the repository holding ``bench``."""
    return [os.fspath(Path(__file__).resolve().parent.parent)]
