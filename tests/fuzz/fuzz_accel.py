"""Coverage-guided fuzzing of the accelerator with atheris (libFuzzer): ``make fuzz``.

Every input goes through accel_oracle.check, which runs the native DataRow kernel, the native Opener, the
native DataRow run scan and the native Bind rewrite next to the Python reference and fails on any
difference; a crash, a hang or
(with the AddressSanitizer build ``make fuzz`` loads) an out-of-bounds access is reported by libFuzzer.
The Python reference is instrumented, so its branches guide the mutations into the kernel's paths.

    python tests/fuzz/fuzz_accel.py [libFuzzer options, e.g. -max_total_time=60] [corpus dirs]

Without atheris (or without the accelerator) it says so and exits 0, so that a bounded run can sit in
``make test`` on machines that have neither.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import atheris
except ImportError:
    print("fuzz_accel: atheris is not installed; skipped")
    sys.exit(0)

with atheris.instrument_imports(
    include=["accel_oracle", "proxy.encrypt.rows", "keymgmt.envelope", "proxy.protocol.codec"]
):
    import accel_oracle

from keymgmt import envelope


def main() -> None:
    if envelope._accel is None:
        print("fuzz_accel: the accelerator is not built; skipped")
        return
    print(f"fuzz_accel: {envelope._accel.__file__} (AES-GCM open: {envelope._accel.gcm_implementation()})", flush=True)
    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):  # no corpus given: start from the seeds
        corpus = tempfile.mkdtemp(prefix="pgveil-fuzz-")
        for i, seed in enumerate(accel_oracle.seeds()):
            with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
                f.write(seed)
        args.append(corpus)
    atheris.Setup(args, accel_oracle.check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
