"""The accelerator's sealing nonces: read from the OS CSPRNG a batch at a time, each handed out once, and
a forked child never hands out its parent's (the batch lives in a page the kernel wipes in a child)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

from keymgmt import native

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(native.MODULE) is None or not hasattr(os, "fork"),
    reason="the accelerator is not built (or no fork here)",
)

PREFIX_LENGTH = 20  # magic . version . algorithm . key id
NONCE_END = 32
# More than the batch the accelerator reads at once (256), so a refill happens in both processes.
COUNT = 700


def _nonces(count: int) -> list[bytes]:
    accel = importlib.import_module(native.MODULE)
    key = accel.Key(b"m" * 32)
    prefix = accel.PREFIX_V1 + b"k" * 16
    out = []
    for i in range(count):
        envelope = key.seal(prefix, b"value %d" % i, b"\x00public.t.c")
        nonce = envelope[PREFIX_LENGTH:NONCE_END]
        assert key.decrypt(nonce, envelope[NONCE_END:], envelope[:NONCE_END] + b"\x00public.t.c") == b"value %d" % i
        out.append(nonce)
    return out


def test_nonces_are_distinct_across_batches() -> None:
    nonces = _nonces(COUNT)
    assert len(set(nonces)) == COUNT


def test_a_forked_child_never_repeats_its_parents_nonces() -> None:
    _nonces(3)  # the parent has a batch under way when it forks
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its nonces to the pipe, then exit without running the parent's cleanup
        code = 0
        try:
            with os.fdopen(write_end, "wb") as w:
                w.write(b"".join(_nonces(COUNT)))
        except BaseException:
            code = 1
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(write_end)
    parent = _nonces(COUNT)
    with os.fdopen(read_end, "rb") as r:
        data = r.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child = [data[i : i + 12] for i in range(0, len(data), 12)]
    assert len(child) == COUNT
    assert len(set(child)) == COUNT
    assert not set(child) & set(parent)
