"""Which implementation of the envelope and DataRow kernels this process runs: the compiled accelerator
(the ``pgveil_accel`` extension module, C over OpenSSL's libcrypto) or the pure-Python reference.

Decided once, when this module is first imported, and never changed afterwards: every DataKey of the
process holds a cipher of the chosen kind. ``PGVEIL_IMPL`` selects:

* unset or ``auto``: the accelerator if it is built and loads, otherwise Python (the reason is kept);
* ``python``: the pure-Python implementation, even where the accelerator is built;
* ``native``: the accelerator, and an ImportError when it is missing (for deployments and CI that must
  not fall back silently).

This module only selects; :mod:`keymgmt.envelope` checks that the accelerator agrees with the envelope
layout it defines before using it. It must not import anything of pgveil's.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Final

log = logging.getLogger(__name__)

ENV_VAR: Final = "PGVEIL_IMPL"
MODULE: Final = "pgveil_accel"


def _select() -> tuple[Any, str]:
    """(the accelerator module or None, why Python runs when it is None)."""
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if wanted == "python":
        return None, f"{ENV_VAR}=python"
    if wanted not in ("auto", "native"):
        raise ImportError(f"{ENV_VAR} must be 'auto', 'native' or 'python', not {wanted!r}")
    try:
        module = importlib.import_module(MODULE)
    except ImportError as e:
        if wanted == "native":
            raise ImportError(f"{ENV_VAR}=native but the accelerator does not load: {e}") from e
        return None, f"the accelerator is not built ({e})"
    return module, ""


_selected, _why = _select()
accel: Final[Any] = _selected

IMPLEMENTATION: Final[str] = "native" if accel is not None else "python"


def describe() -> str:
    """One line for logs and ``pgveil --version``: which implementation runs, and why not native."""
    if accel is not None:
        gcm = accel.gcm_implementation()
        why = accel.gcm_fallback_reason()
        opens = f"AES-GCM open: {gcm}" + (f" ({why})" if why else "")
        return f"native ({MODULE} {accel.__version__}, {accel.OPENSSL_VERSION}, {opens})"
    return f"python ({_why})"


log.debug("envelope and DataRow kernels: %s", describe())
