"""Loads fastflow._C, the C++ CPU kernels (csrc/), which registers the torch ops torch.ops.fastflow.*.

`import fastflow` loads the prebuilt module when it is there and matches the installed torch (a shared-library
load, no build; so a TorchScript file that calls fastflow's ops loads after `import fastflow`);
FASTFLOW_SKIP_EXTENSION=1 skips the prebuilt module. Otherwise the
first use of the cpp backend calls `load_extension()`:

1. the prebuilt module from `pip install --no-build-isolation [-e] .`, unless built against another torch;
2. else, in a source checkout with ninja, a just-in-time build of csrc/*.cpp (once, cached by torch in
   ~/.cache/torch_extensions); opt out with FASTFLOW_NO_JIT=1;
3. else nothing: the reason is recorded, and fastflow.ops.backends raises for an explicit `backend="cpp"` or
   warns once and uses the reference for `backend="auto"`.
"""

import importlib
import importlib.util
import logging
import os
import re
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_JIT_NAME = "fastflow__C_jit"
_BUILD_HINT = "Build it with `pip install --no-build-isolation -e .`"

_lock = threading.Lock()
_status: dict | None = None  # set once by load_extension()


_on_load: list = []  # callbacks run once fastflow._C is loaded (fastflow.ops.backends binds the ops' fakes)


def load_extension() -> bool:
    """Load the C++ ops once per process; True if torch.ops.fastflow.* have CPU kernels."""
    global _status
    if _status is None:  # checked before taking the lock so that torch.compile can trace a loaded extension
        with _lock:
            if _status is None:
                _status = _load()
        if _status["loaded"]:
            for callback in _on_load:
                callback()
    return _status["loaded"]


def load_prebuilt() -> bool:
    """Load the prebuilt fastflow._C if present and built for this torch; never builds, never warns. A miss
    leaves everything to load_extension() (which may then JIT-build and reports why)."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                prebuilt = _load_prebuilt()
                if prebuilt["loaded"]:
                    _status = prebuilt
        if is_loaded():
            for callback in _on_load:
                callback()
    return is_loaded()


def on_load(callback) -> None:
    """Run ``callback()`` when fastflow._C is loaded: now if it already is, else right after it loads."""
    _on_load.append(callback)
    if is_loaded():
        callback()


def is_loaded() -> bool:
    """Whether fastflow._C is loaded already (never loads it)."""
    return _status is not None and _status["loaded"]


def extension_status() -> dict:
    """{"loaded": bool, "how": "prebuilt" | "jit" | None, "reason": str | None}; loads on first call."""
    load_extension()
    return dict(_status)


def _load() -> dict:
    prebuilt = _load_prebuilt()
    return prebuilt if prebuilt["loaded"] else _load_jit(prebuilt["reason"])


def _load_prebuilt() -> dict:
    spec = importlib.util.find_spec("fastflow._C")
    if os.environ.get("FASTFLOW_SKIP_EXTENSION") == "1":
        reason = "the prebuilt fastflow._C is skipped (FASTFLOW_SKIP_EXTENSION=1)"
    elif spec is None:
        reason = "fastflow._C is not built"
    else:
        built_with = _torch_version_built_with(Path(spec.origin))
        running = torch.__version__.split("+")[0]
        if built_with is not None and built_with != running:
            reason = (
                f"fastflow._C ({spec.origin}) was built against torch {built_with}, "
                f"but torch {torch.__version__} is installed"
            )
        else:
            try:
                importlib.import_module("fastflow._C")
                return {"loaded": True, "how": "prebuilt", "reason": None}
            except (ImportError, OSError) as error:
                reason = f"importing fastflow._C failed: {error}"
    return {"loaded": False, "how": None, "reason": reason}


def _load_jit(reason: str) -> dict:
    from torch.utils.cpp_extension import is_ninja_available, load

    sources = sorted(str(p) for p in _CSRC.glob("*.cpp"))
    if os.environ.get("FASTFLOW_NO_JIT") == "1":
        return _not_loaded(f"{reason}; JIT build disabled by FASTFLOW_NO_JIT=1")
    if not sources:
        return _not_loaded(f"{reason}; no csrc/*.cpp to JIT-build from (not a source checkout)")
    if not is_ninja_available():
        return _not_loaded(f"{reason}; JIT build needs ninja (`pip install ninja`)")
    logger.warning("%s; compiling csrc/ just in time (once, about a minute; cached by torch)", reason)
    flags = ["-O3", "-fopenmp"]  # as setup.py
    if os.environ.get("FASTFLOW_NATIVE") == "1":
        flags.append("-march=native")
    try:
        load(
            name=_JIT_NAME,
            sources=sources,
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (
        RuntimeError,
        OSError,
        ImportError,
    ) as error:  # a compiler error must not break the reference path
        return _not_loaded(f"{reason}; JIT build failed: {error}")
    return {"loaded": True, "how": "jit", "reason": reason}


def _not_loaded(reason: str) -> dict:
    return {"loaded": False, "how": None, "reason": f"{reason}. {_BUILD_HINT}"}


def _torch_version_built_with(library: Path) -> str | None:
    # Marker compiled into the library by csrc/registration.cpp; read without loading it.
    match = re.search(rb"fastflow-built-with-torch=([0-9A-Za-z.]+)", library.read_bytes())
    return match.group(1).decode() if match else None
