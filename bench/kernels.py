"""Micro-benchmarks of the per-value kernels, native accelerator against the pure-Python reference, in
one process and one run: no sockets, no server, so the numbers are the kernels' own cost.

    .venv/bin/python -m bench.kernels [--rows 1000] [--repeat 15]

Prints, per kernel, the median and the spread (min..max) over ``--repeat`` timings of µs per row (rows of
5 encrypted text values of 20 bytes, as the ``wide-fetch-encrypted`` workload reads them) or per value
(sealing) or per Bind, and the native/Python speed-up. On a shared machine the spread says how far to trust the
median. The DataRow kernels are checked to give the same bytes before they are timed.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keymgmt import envelope
from keymgmt.envelope import DataKey, Opener, column_associated_data, seal
from keymgmt.keycache import KeyCache
from proxy.encrypt import rows
from proxy.encrypt.engine import ColumnCrypto, CryptoContext, SessionCrypto, StatementCrypto
from proxy.encrypt.keyring import KeyRing
from proxy.pgtypes import SessionFormat, codec_for
from proxy.protocol import codec, relay
from proxy.protocol import messages as m
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable

FMT = SessionFormat()
COLUMNS = [ProtectedColumn("public", "bench_wide_enc", f"c{i}", "text", attnum=i + 1, table_oid=1) for i in range(5)]


class _KeyWithMaterial(DataKey):
    """A DataKey that keeps its material, so the benchmark can build the Python twin of a native key
    (DataKey itself never keeps it)."""

    __slots__ = ("_material",)
    _material: bytes

    @classmethod
    def make(cls, key_id: bytes, material: bytes) -> _KeyWithMaterial:
        base = DataKey.from_material(key_id, material)
        key = cls(base.key_id, base.state, base.column_id, base.subject, base.version, base._cipher, base._prefix)
        object.__setattr__(key, "_material", material)
        return key


def _run(n_rows: int, *, server_binary: bool) -> tuple[bytes, rows.RowPlan, dict[bytes, DataKey]]:
    keys: dict[bytes, DataKey] = {}
    plan = []
    for i, col in enumerate(COLUMNS):
        cc = ColumnCrypto(col, codec_for("text"), column_associated_data(col.column_id))
        plan.append(cc.output(server_binary=server_binary, client_binary=False, fmt=FMT))
        keys[bytes([i + 1]) * 16] = _KeyWithMaterial.make(bytes([i + 1]) * 16, bytes([i + 1]) * 32)
    key_list = list(keys.values())
    out = []
    for r in range(n_rows):
        body = [struct.pack("!h", 5)]
        for i, o in enumerate(plan):
            e = seal(key_list[i], (b"row %06d column %d" % (r, i))[:20], o.associated)
            v = e if server_binary else b"\\x" + e.hex().encode()
            body.append(struct.pack("!i", len(v)) + v)
        b = b"".join(body)
        out.append(b"D" + struct.pack("!I", len(b) + 4) + b)
    return b"".join(out), tuple(plan), keys


def _time(fn: Callable[[], object], repeat: int, per: int) -> list[float]:
    fn()
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e6 / per)
    return samples


def _python_key(key: DataKey) -> DataKey:
    """The same key with cryptography's AESGCM, as PGVEIL_IMPL=python builds it."""
    assert isinstance(key, _KeyWithMaterial)
    return DataKey(key.key_id, key.state, key.column_id, key.subject, key.version, AESGCM(key._material), key._prefix)


def _name(server_binary: bool) -> str:
    kind = "binary (extended protocol)" if server_binary else "bytea hex text (simple query)"
    return f"DataRow batch, 5 encrypted text values per row, {kind}"


def _datarow_timings(
    data: bytes, plan: rows.RowPlan, keys: dict[bytes, DataKey], repeat: int, n_rows: int
) -> tuple[list[float], list[float]]:
    """(native, python) µs per row: rows.rewrite_data_rows as the proxy calls it, with the accelerator,
    and the Python loop it falls back to, with cryptography's ciphers."""
    memo: dict[bytes, object] = {}
    _, steps, fast, native_columns, _, _, _, _ = rows._compile(plan)
    assert native_columns is not None
    python_keys = {k: _python_key(v) for k, v in keys.items()}
    py_open = Opener(python_keys.get, python=True).open

    def native() -> bytes:
        return rows.rewrite_data_rows(data, 0, len(data), plan, keys.get, FMT, memo)

    def python() -> bytes:
        if fast is not None:
            return rows._rewrite_fast(data, 0, len(data), plan, fast, py_open)
        return rows._rewrite_general(data, 0, len(data), plan, steps, py_open, FMT)

    assert native() == python()
    return _time(native, repeat, n_rows), _time(python, repeat, n_rows)


class _KeySource:
    """The keystore's cached lookups for the Bind benchmark: every column's key in a real KeyCache, as the
    keystore holds them between refreshes (each Bind looks each column's key up there)."""

    def __init__(self, keys: list[DataKey]) -> None:
        self.cache = KeyCache(1024, 3600.0, time.monotonic)
        for key in keys:
            self.cache.put(key, current=True)

    def cached_active_key(self, column_id: str, subject: bytes | None = None) -> DataKey | None:
        return self.cache.get_current(column_id, subject)


def _bind_timings(repeat: int, n: int) -> tuple[list[float], list[float]]:
    """(native, python) µs per Bind: SessionCrypto.bind of the insert-encrypted INSERT (5 text parameters of
    20 bytes), with the statement's native plan and without it (the Python path, its values sealed by the
    accelerator's Key all the same)."""
    columns = {
        f"c{i}": ProtectedColumn("public", "bench_ins_enc", f"c{i}", "text", attnum=i + 1, table_oid=1)
        for i in range(1, 6)
    }
    table = ProtectedTable("public", "bench_ins_enc", columns, ("id", *columns), oid=1)
    keys = [
        DataKey.from_material(bytes([i]) * 16, bytes([i]) * 32, column_id=c.column_id)
        for i, c in enumerate(columns.values(), 1)
    ]
    ring = KeyRing(_KeySource(keys))  # type: ignore[arg-type]
    crypto = SessionCrypto(CryptoContext(Catalog({("public", "bench_ins_enc"): table}), ring), "bench")
    parsed = crypto.parse(
        m.Parse("s", "INSERT INTO bench_ins_enc (c1, c2, c3, c4, c5) VALUES ($1, $2, $3, $4, $5)", ())
    )
    stmt = parsed.state
    assert isinstance(stmt, StatementCrypto)
    assert stmt.sealer is not None
    bind = codec.decode_bind_frame(codec.encode_bind_body(m.Bind("", "s", (), (b"abcdefghijklmnopqrst",) * 5, ())))
    sealer = stmt.sealer

    def native() -> None:
        for _ in range(n):
            crypto.bind(bind, stmt, None)

    def python() -> None:
        stmt.sealer = None
        try:
            for _ in range(n):
                crypto.bind(bind, stmt, None)
        finally:
            stmt.sealer = sealer

    return _time(native, repeat, n), _time(python, repeat, n)


def _line(name: str, native: list[float], python: list[float], unit: str) -> str:
    mn, mp = statistics.median(native), statistics.median(python)
    return (
        f"| {name} | {mn:.3f} ({min(native):.3f}..{max(native):.3f}) | {mp:.3f} ({min(python):.3f}..{max(python):.3f})"
        f" | {unit} | {mp / mn:.1f}x |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args(argv)
    accel = envelope._accel
    if accel is None:
        print("bench.kernels: the accelerator is not built (or PGVEIL_IMPL=python): nothing to compare")
        return 1
    print(f"accelerator: {accel.__file__} ({accel.OPENSSL_VERSION})")
    print("| kernel | native µs (min..max) | python µs (min..max) | per | python/native |")
    print("| --- | --- | --- | --- | --- |")
    for server_binary in (True, False):
        data, plan, keys = _run(args.rows, server_binary=server_binary)
        print(_line(_name(server_binary), *_datarow_timings(data, plan, keys, args.repeat, args.rows), "row"))
    # Sealing one value: the accelerator's Key.seal against cryptography's AESGCM, through keymgmt.seal.
    key_material = bytes(range(32))
    native_key = DataKey.from_material(b"k" * 16, key_material)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    python_key = DataKey(native_key.key_id, native_key.state, "", None, 1, AESGCM(key_material), native_key._prefix)
    associated = column_associated_data("public.bench_ins_enc.c1")
    plaintext = b"x" * 20
    n = args.rows

    def seal_native() -> None:
        for _ in range(n):
            seal(native_key, plaintext, associated)

    def seal_python() -> None:
        saved, envelope._accel = envelope._accel, None
        try:
            for _ in range(n):
                seal(python_key, plaintext, associated)
        finally:
            envelope._accel = saved

    print(
        _line(
            "seal one 20-byte value (nonces read from getrandom 256 at a time)",
            _time(seal_native, args.repeat, n),
            _time(seal_python, args.repeat, n),
            "value",
        )
    )
    print(
        _line(
            "Bind of 5 text parameters (SessionCrypto.bind): one native call, or the Python path",
            *_bind_timings(args.repeat, n),
            "Bind",
        )
    )
    data, _, _ = _run(args.rows, server_binary=True)
    first_end = 1 + struct.unpack_from("!I", data, 1)[0]
    assert accel.data_row_run(data, first_end, len(data)) == relay._data_row_run(data, first_end, len(data))
    print(
        _line(
            "DataRow run scan",
            _time(lambda: accel.data_row_run(data, first_end, len(data)), args.repeat, args.rows),
            _time(lambda: relay._data_row_run(data, first_end, len(data)), args.repeat, args.rows),
            "row",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
