"""The relay's scan for the end of a run of DataRows: the accelerator's scan (when built) gives what the
Python reference gives, on well-formed runs and on arbitrary bytes, from any offset."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keymgmt import native
from proxy.protocol import relay


def frame(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


def test_the_relay_uses_the_accelerator_when_it_runs() -> None:
    expected = relay.data_row_run_py if native.accel is None else native.accel.data_row_run
    assert relay._data_row_run is expected


def test_a_run_stops_at_the_first_other_or_incomplete_message() -> None:
    rows = [frame(b"D", b"\x00\x01" + struct.pack("!i", 3) + b"abc") for _ in range(3)]
    data = b"".join(rows) + frame(b"C", b"SELECT 3\x00") + rows[0][:6]
    first = len(rows[0])
    assert relay._data_row_run(data, first, len(data)) == (3 * first, 3)
    assert relay._data_row_run(data[: 3 * first + 2], first, 3 * first + 2) == (3 * first, 3)


@pytest.mark.skipif(native.accel is None, reason="the accelerator is not built or PGVEIL_IMPL=python")
@given(
    st.lists(st.tuples(st.sampled_from([b"D", b"C", b"d", b"\x00"]), st.binary(max_size=12)), max_size=8),
    st.binary(max_size=16),
    st.integers(0, 200),
    st.integers(-3, 0),
)
def test_the_native_scan_matches_the_reference(
    messages: list[tuple[bytes, bytes]], junk: bytes, start: int, cut: int
) -> None:
    data = b"".join(frame(t, b) for t, b in messages) + junk
    n = max(0, len(data) + cut)
    end = min(start, n)
    assert native.accel.data_row_run(data, end, n) == relay.data_row_run_py(data, end, n)
