"""Operator-facing surface of a proxy process: Prometheus metrics (:mod:`proxy.admin.metrics`) and the
admin HTTP server with health, readiness and the versioned admin API (:mod:`proxy.admin.app`).

Kept import-light on purpose: the data path imports :mod:`proxy.admin.metrics` without pulling in aiohttp.
"""
