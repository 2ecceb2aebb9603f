"""Builds the optional native accelerator, pgveil_accel (native/pgveil_accel.c, over OpenSSL's libcrypto).

Everything else about the project is in pyproject.toml. Where no C compiler, Python headers or OpenSSL
headers exist, the build prints why and installs pgveil without the accelerator: it then runs its
pure-Python implementation. ``PGVEIL_BUILD_NATIVE`` changes that: ``0`` skips the build, ``1`` makes a
failed build fail the install (CI and images that must not fall back silently).
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODE = os.environ.get("PGVEIL_BUILD_NATIVE", "auto").strip().lower()


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed build of the accelerator into a warning, unless it is required."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:
            self._give_up(e)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:
            self._give_up(e)

    def _give_up(self, error: Exception) -> None:
        if MODE == "1":
            raise error
        print(
            "\n*** pgveil: the native accelerator (pgveil_accel) was not built: "
            f"{error}\n*** pgveil: it needs a C compiler, the Python headers and OpenSSL's (Debian: "
            "gcc python3-dev libssl-dev).\n*** pgveil: installing without it; pgveil runs its "
            "pure-Python implementation (slower on encrypted results).\n",
            file=sys.stderr,
        )


ext_modules = []
if MODE != "0":
    ext_modules.append(
        Extension(
            "pgveil_accel",
            sources=["native/pgveil_accel.c", "native/pgveil_gcm.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
