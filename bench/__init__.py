"""pgveil's benchmarks: the same workloads against a direct connection and the middlemen (pgveil,
PgBouncer), interleaved, reported as ratios to direct.

Development tooling only: nothing in :mod:`proxy` or :mod:`keymgmt` imports from here. Entry point:
``python -m bench.run`` (see :mod:`bench.run`).
"""
