"""Which implementation of a fastflow op runs (`reference`, `cpp`, `triton`, or `auto`), and in which precision.

- reference: plain PyTorch, any device; the numerical ground truth.
- cpp: C++ kernels of fastflow._C (csrc/), CPU tensors.
- triton: Triton kernels (triton_kernels/), CUDA tensors (CPU tensors under TRITON_INTERPRET=1, for tests).
- auto: cpp on CPU, triton on CUDA; if that fast path is missing, the reference, with one warning per reason.

An explicit request that cannot be honoured raises; nothing falls back silently.

Precisions of the matrix products inside fused ops and patched modules (fp32 inputs and outputs throughout):
- fp32: float32 products on vector units (the default).
- bf16: bfloat16 operands, float32 accumulation: AMX or AVX512-BF16 on CPUs, tensor cores on GPUs.
- tf32: TF32 tensor-core products (GPU only).
- auto: bf16 where the hardware has bf16 matrix or dot-product instructions, else fp32.
"""

import importlib.util
import os
import warnings

import torch

from fastflow import _extension

BACKENDS = ("auto", "cpp", "triton", "reference")
# Tensor products may also run on cuEquivariance's CUDA kernels (fastflow.nn.TensorProduct, patch_model).
TP_BACKENDS = (*BACKENDS, "cuequivariance")
FLOAT_DTYPES = (torch.float32, torch.float64)  # what every fastflow kernel computes in
PRECISIONS = ("fp32", "bf16", "tf32")  # an op's `precision` argument; patch_model also takes "auto"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (the message says why and what to use instead)."""


_warned: set[str] = set()  # reasons already warned about by `auto`
_registered: set[str] = set()  # C++ ops whose fake kernel and autograd are registered
_pending_binders: list = []  # op modules' binders still waiting for fastflow._C (see bind_cpp_ops)


def resolve_backend(name: str | None, device: torch.device | str) -> str:
    """The concrete backend (`cpp`, `triton` or `reference`) that `name` selects for tensors on `device`."""
    name = name or "auto"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if name == "reference":
        return name
    if name == "auto":
        fast = {"cpu": "cpp", "cuda": "triton"}.get(device.type)
        reason = _unavailable_reason(fast, device) if fast else f"no fast backend for {device.type} tensors"
        if reason is None:
            return fast
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"fastflow: backend 'auto' uses the PyTorch reference ops: {reason}", stacklevel=3)
        return "reference"
    reason = _unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} requested but {reason}")
    return name


class OpFamily:
    """Which backends an op family (ops sharing one csrc/ file and one triton_kernels/ module) has here.

    Each check runs once per process (torch.compile cannot trace them); `auto` falling back to the reference is
    warned about once per reason, an explicit request that cannot run raises.
    """

    def __init__(self, what: str, cpp_ops: tuple[str, ...], source: str, triton_module: str):
        self.what, self.cpp_ops, self.source, self.triton_module = what, cpp_ops, source, triton_module
        self.available: set[str] = set()

    def cpp_unavailable_reason(self) -> str | None:
        """None if fastflow._C is loaded with CPU kernels for these ops, else why not."""
        if not _extension.load_extension():
            return _extension.extension_status()["reason"]
        for name in self.cpp_ops:
            if not hasattr(torch.ops.fastflow, name) or not torch._C._dispatch_has_kernel_for_dispatch_key(
                f"fastflow::{name}", "CPU"
            ):
                return (
                    f"the loaded fastflow._C has no CPU kernel for fastflow::{name} (built before "
                    f"{self.source}? rebuild with `pip install --no-build-isolation -e .`)"
                )
        self.available.add("cpp")
        return None

    def triton_unavailable_reason(self) -> str | None:
        """None if the family's Triton module exists (triton itself is checked by resolve_backend)."""
        try:
            found = importlib.util.find_spec(self.triton_module) is not None
        except (ImportError, ValueError):
            found = False
        return None if found else f"{self.triton_module} is not installed"

    def resolve(self, backend: str | None, device: torch.device) -> str:
        """The backend that runs: `backend` (or auto's choice) if it is here, else the reference (auto only)."""
        chosen = resolve_backend(backend, device)
        if chosen == "reference" or chosen in self.available:
            return chosen
        reason = {"cpp": self.cpp_unavailable_reason, "triton": self.triton_unavailable_reason}[chosen]()
        if reason is None:
            self.available.add(chosen)
            return chosen
        if (backend or "auto") != "auto":
            raise BackendUnavailable(f"backend {backend!r} requested but {reason}")
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"fastflow: {self.what} use the PyTorch reference ops: {reason}", stacklevel=3)
        return "reference"

    def require_cpp(self) -> None:
        """Raise if the C++ kernels are missing (checked once, before binding them)."""
        if "cpp" not in self.available:
            reason = self.cpp_unavailable_reason()  # loads fastflow._C
            if reason is not None:
                names = " / ".join(f"fastflow::{name}" for name in self.cpp_ops)
                raise BackendUnavailable(f"{names} not available: {reason}")


def register_cpp_op(name: str, fake, backward=None, setup_context=None):
    """torch.ops.fastflow.<name>.default, a C++ op of fastflow._C (schema defined in C++), with its fake kernel
    (and its autograd formula, if given) registered on the first call.

    Call it from the op's module: torch checks that the fake kernel is registered from the module the C++ schema
    names (``m.set_python_module`` in csrc/registration.cpp), and _stacklevel=2 makes that the caller's module.
    """
    if name not in _registered:
        if not hasattr(torch.ops.fastflow, name):
            raise BackendUnavailable(
                f"the loaded fastflow._C has no fastflow::{name} (built from older sources? "
                "rebuild with `pip install --no-build-isolation -e .`)"
            )
        torch.library.register_fake(f"fastflow::{name}", _stacklevel=2)(fake)
        if backward is not None:
            torch.library.register_autograd(f"fastflow::{name}", backward, setup_context=setup_context)
        _registered.add(name)
    return getattr(torch.ops.fastflow, name).default


def recompute_vjp(reference, inputs: tuple, n_tensors: int, cotangents, skip: tuple[int, ...] = ()) -> tuple:
    """Autograd of a forward-only fused op by recomputation: the vector-Jacobian product of ``reference`` (its
    plain-PyTorch definition, called as ``reference(*inputs)``) at ``inputs``, evaluated with torch.func so that it
    is itself traceable. The first ``n_tensors`` inputs are tensors or None; those that are None or listed in
    ``skip`` (e.g. a bool mask) get no gradient, nor do the non-tensor inputs after them. Returns one gradient (or
    None) per input, for ``register_autograd``."""
    differentiable = [i for i, t in enumerate(inputs[:n_tensors]) if t is not None and i not in skip]

    def at(*chosen):
        args = list(inputs)
        for i, t in zip(differentiable, chosen):
            args[i] = t
        return reference(*args)

    _, vjp = torch.func.vjp(at, *[inputs[i] for i in differentiable])
    grads = [None] * len(inputs)
    for i, g in zip(differentiable, vjp(cotangents)):
        grads[i] = g
    return tuple(grads)


def bind_cpp_ops(binder) -> None:
    """Run ``binder()`` — an op module's function that calls :func:`register_cpp_op` for its C++ ops — as soon as
    fastflow._C is loaded: now if it is, else as soon as anything loads it. So the registration happens in
    eager Python before any use, never first inside a torch.compile trace, where the caller's module (which
    torch checks against csrc/registration.cpp's set_python_module) would be misread."""
    _pending_binders.append(binder)
    if _extension.is_loaded():
        _run_binders()


def _run_binders() -> None:
    while _pending_binders:
        try:
            _pending_binders.pop(0)()
        except (
            BackendUnavailable
        ):  # an op this build of fastflow._C lacks: the error comes back on its first use
            pass


_extension.on_load(_run_binders)


def check_precision(op: str, precision: str, dtype: torch.dtype) -> None:
    """An op's `precision` argument against its inputs' dtype: bf16 and tf32 are float32 modes."""
    if precision not in PRECISIONS:
        raise ValueError(f"{op}: precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "fp32" and dtype != torch.float32:
        raise ValueError(f"{op}: precision {precision!r} needs float32 inputs, got {dtype}")


def check_triton_precision(op: str, precision: str, dtype: torch.dtype, backend: str) -> None:
    """An op whose tf32 / bf16 variants are Triton kernels only (tensor products, bond_head): the precision, its
    dtype, a backend that has the variant, and no bf16 under Triton's interpreter, whose bf16 dots are wrong."""
    check_precision(op, precision, dtype)
    if precision != "fp32" and backend != "triton":
        raise ValueError(f"{op}: precision {precision!r} runs on the triton backend only, not {backend!r}")
    if precision == "bf16" and os.environ.get("TRITON_INTERPRET") == "1":
        raise BackendUnavailable(
            f"{op} (triton): precision 'bf16' cannot run under TRITON_INTERPRET=1 (the interpreter computes "
            "bf16 dots wrongly); it runs on a GPU"
        )


def resolve_precision(name: str, device: torch.device | str) -> str:
    """patch_model's `precision` → the one fused modules use on `device`. An explicit bf16 where the hardware has
    no bf16 instructions, or tf32 off a GPU, raises BackendUnavailable (it would run, emulated and slow)."""
    from fastflow.runtime import cpu_isa  # the machine's ISA, read once

    device = torch.device(device)
    if name not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be one of {('auto', *PRECISIONS)}, got {name!r}")
    if device.type == "cuda":
        has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        has_tf32 = torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    else:
        has_bf16 = bool({"amx_bf16", "avx512_bf16"} & set(cpu_isa()))
        has_tf32 = False
    if name == "auto":
        return "bf16" if has_bf16 else "fp32"
    if name == "bf16" and not has_bf16:
        raise BackendUnavailable(
            f"precision 'bf16' needs bf16 matrix instructions (AMX-BF16 or AVX512-BF16 on a CPU, Ampere or newer "
            f"GPU); this {device.type} has none: use precision='fp32' (or 'auto')"
        )
    if name == "tf32" and not has_tf32:
        raise BackendUnavailable(
            f"precision 'tf32' is a tensor-core format of CUDA GPUs (compute capability >= 8.0), not available "
            f"on {device.type}: use 'bf16' or 'fp32'"
        )
    return name


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Concrete backends that can run on tensors on `device`."""
    device = torch.device(device)
    return [name for name in ("cpp", "triton", "reference") if _unavailable_reason(name, device) is None]


def describe_backends() -> dict:
    """What runs where, for reports: availability (or the reason not) of each backend, and `auto`'s pick."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    return {
        "cpp": {
            "device": "cpu",
            "reason_unavailable": _unavailable_reason("cpp", cpu),
            "extension": _extension.extension_status(),
        },
        "triton": {"device": "cuda", "reason_unavailable": _unavailable_reason("triton", cuda)},
        "auto": {
            "cpu": "cpp" if _unavailable_reason("cpp", cpu) is None else "reference",
            "cuda": "triton" if _unavailable_reason("triton", cuda) is None else "reference",
        },
    }


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    if name == "reference":
        return None
    if name == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on cpu tensors, got {device.type} tensors"
        if not _extension.load_extension():  # loading runs the pending binders (see bind_cpp_ops)
            return _extension.extension_status()["reason"]
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (`pip install triton`)"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no cuda device is available"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (
            f"the triton backend runs on cuda tensors (cpu only under TRITON_INTERPRET=1), got {device.type}"
        )
    raise ValueError(f"unknown backend {name!r}")
