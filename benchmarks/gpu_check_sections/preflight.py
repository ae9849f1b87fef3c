"""0. preflight: what the rest needs from the machine, each entry saying what fails without it."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from gpu_check_sections.context import Context


def section_preflight(ctx: Context) -> dict:
    """The C compiler and Python.h as Triton finds them (``triton/runtime/build.py``: $CC, else gcc, else
    clang; the include directory of the posix_prefix scheme where the default is Debian's posix_local),
    and accelerate; each entry says what fails without it."""
    triton_fails = "every Triton launch on CUDA fails (Triton compiles its launcher stubs with it): " \
                   "sections kernels, attention, engine, nf4, decode"
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    found = cc is not None and shutil.which(cc) is not None
    compiler = dict(ok=found, path=shutil.which(cc) if found else cc,
                    missing=None if found else f"no C compiler ($CC, gcc or clang on PATH): {triton_fails}")
    scheme = sysconfig.get_default_scheme()
    include = Path(sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"])
    header = (include / "Python.h").is_file()
    python_h = dict(ok=header, path=str(include / "Python.h"),
                    missing=None if header else f"no Python.h in {include} (python3-dev): {triton_fails}")
    try:
        import accelerate

        accel = dict(ok=True, version=accelerate.__version__, missing=None)
    except ImportError as error:
        accel = dict(ok=False, version=None,
                     missing=f"accelerate does not import ({error}): transformers cannot load a 4-bit model "
                             f"with a device_map: sections nf4, train (qlora)")
    checks = dict(c_compiler=compiler, python_h=python_h, accelerate=accel)
    missing = [check["missing"] for check in checks.values() if not check["ok"]]
    return dict(ok=not missing, **checks, missing=missing)
