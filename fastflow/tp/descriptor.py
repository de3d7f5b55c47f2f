"""``TPDescriptor``: an e3nn-compatible tensor product as a frozen, hashable value.

A descriptor holds the irreps of both inputs and of the output (e3nn strings, ``mul_ir`` layout: block
``mul × (2l + 1)`` with index ``u · (2l + 1) + i``) and the instructions ``(i_in1, i_in2, i_out, mode, has_weight,
path_weight)`` in e3nn's order, which is also the order of the flat weight vector (each weighted instruction owns
a row-major block of shape ``uvw: (mul1, mul2, mul_out)``, ``uvu``/``uvv``: ``(mul1, mul2)``, ``uuw``:
``(mul1, mul_out)``, ``uuu``: ``(mul1,)``). ``path_weight`` is the final factor of the path, normalisations
included, exactly as e3nn stores it in ``TensorProduct.instructions`` after construction; the Clebsch–Gordan
block of a path is ``e3nn.o3.wigner_3j(l1, l2, l_out) * path_weight`` (or, for descriptors read from
cuequivariance modules, that module's own coefficients, stored in the instruction).

Build one with:
    TPDescriptor.from_e3nn(tp)               an ``e3nn.o3.TensorProduct`` (FullyConnected/Elementwise... included)
    TPDescriptor.from_cuequivariance(tp)     ``cuet.ChannelWiseTensorProduct`` / ``cuet.FullyConnectedTensorProduct``
    TPDescriptor.create(irreps_in1, irreps_in2, irreps_out, instructions, irrep_normalization, path_normalization)
                                             e3nn's constructor arithmetic, without building an e3nn module
    TPDescriptor.from_module(m)              whichever of the first two applies

``descriptor.tensors(dtype, device)`` gives the kernels' format (``paths``, ``cg_index``, ``cg_value``,
``cg_offsets``; see :mod:`fastflow.ops.tensor_product`), computed once per (descriptor, dtype, device).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import NamedTuple

import torch

MODES = ("uvw", "uvu", "uvv", "uuw", "uuu")  # connection modes; the index is the mode code of paths[:, 0]
IRREP_NORMALIZATIONS = ("component", "norm", "none")
PATH_NORMALIZATIONS = ("element", "path", "none")
_CG_TOLERANCE = 1e-10  # |C| below this is an exact zero of wigner_3j up to rounding: dropped


class Irrep(NamedTuple):
    """``mul`` copies of the irrep of degree ``l`` and parity ``p`` (+1 even, -1 odd)."""

    mul: int
    l: int
    p: int

    @property
    def dim(self) -> int:
        return 2 * self.l + 1

    def __str__(self) -> str:
        return f"{self.mul}x{self.l}{'e' if self.p == 1 else 'o'}"


class Instruction(NamedTuple):
    """One path. ``cg``: None for e3nn's ``wigner_3j``, else explicit ``((i, j, k, value), ...)``."""

    i_in1: int
    i_in2: int
    i_out: int
    mode: str
    has_weight: bool
    path_weight: float = 1.0
    cg: tuple | None = None


_TERM = re.compile(r"^(?:(\d+)\s*x\s*)?(\d+)\s*([eoy])$")


def parse_irreps(irreps) -> tuple[Irrep, ...]:
    """e3nn's irreps string (``"32x0e+16x1o"``, ``"1e"``, ``"2x1y"``) or an e3nn/cuequivariance Irreps object,
    as a tuple of :class:`Irrep`. Blocks of multiplicity 0 are kept (they keep e3nn's instruction indices)."""
    if isinstance(irreps, (tuple, list)) and all(isinstance(b, Irrep) for b in irreps):
        return tuple(irreps)
    if not isinstance(irreps, str):
        try:
            return tuple(Irrep(int(mul), int(ir.l), int(ir.p)) for mul, ir in irreps)
        except (TypeError, AttributeError, ValueError) as error:
            raise TypeError(
                f"irreps must be a string like '32x0e+16x1o' or an Irreps object, got {irreps!r}"
            ) from error
    blocks = []
    for term in irreps.split("+") if irreps.strip() else []:
        match = _TERM.match(term.strip())
        if match is None:
            raise ValueError(
                f"cannot parse irrep {term.strip()!r} in irreps {irreps!r} (expected e.g. '32x1o')"
            )
        mul, l, p = int(match.group(1) or 1), int(match.group(2)), match.group(3)
        blocks.append(Irrep(mul, l, {"e": 1, "o": -1, "y": (-1) ** l}[p]))
    return tuple(blocks)


def irreps_string(irreps) -> str:
    """Canonical string: ``"32x0e+1x1o"`` (multiplicities always written, zero blocks kept)."""
    return "+".join(str(block) for block in parse_irreps(irreps))


def weight_shape(mode: str, mul1: int, mul2: int, mul_out: int) -> tuple[int, ...]:
    """Shape of one path's weight block, in e3nn's order."""
    return {
        "uvw": (mul1, mul2, mul_out),
        "uvu": (mul1, mul2),
        "uvv": (mul1, mul2),
        "uuw": (mul1, mul_out),
        "uuu": (mul1,),
    }[mode]


@dataclasses.dataclass(frozen=True)
class TPDescriptor:
    """A tensor product ``out = Σ_paths W ⋅ CG(x1, x2)`` (see the module docstring); frozen and hashable."""

    irreps_in1: str
    irreps_in2: str
    irreps_out: str
    instructions: tuple[Instruction, ...]
    # How the path weights were made (metadata): None when read from a module, where they come folded in.
    irrep_normalization: str | None = None
    path_normalization: str | None = None
    source: str = "e3nn"  # "e3nn" (wigner_3j CG), "cuequivariance" (explicit CG), "manual"

    def __post_init__(self):
        for name in ("irreps_in1", "irreps_in2", "irreps_out"):
            object.__setattr__(self, name, irreps_string(getattr(self, name)))
        instructions = []
        for ins in self.instructions:
            if not isinstance(ins, Instruction):
                ins = Instruction(*ins)
            ins = ins._replace(
                i_in1=int(ins.i_in1),
                i_in2=int(ins.i_in2),
                i_out=int(ins.i_out),
                has_weight=bool(ins.has_weight),
                path_weight=float(ins.path_weight),
                cg=None
                if ins.cg is None
                else tuple((int(i), int(j), int(k), float(v)) for i, j, k, v in ins.cg),
            )
            instructions.append(ins)
        object.__setattr__(self, "instructions", tuple(instructions))
        self._validate()

    # ---- constructors ----

    @classmethod
    def create(
        cls,
        irreps_in1,
        irreps_in2,
        irreps_out,
        instructions,
        irrep_normalization: str = "component",
        path_normalization: str = "element",
        in1_var=None,
        in2_var=None,
        out_var=None,
    ) -> TPDescriptor:
        """The descriptor ``e3nn.o3.TensorProduct(irreps_in1, irreps_in2, irreps_out, instructions, ...)`` would
        have: instructions ``(i_in1, i_in2, i_out, mode, has_weight[, path_weight])``, path weights normalised by
        e3nn's rules (``irrep_normalization`` component | norm | none, ``path_normalization`` element | path |
        none, optional input/output variances)."""
        if irrep_normalization not in IRREP_NORMALIZATIONS:
            raise ValueError(
                f"irrep_normalization must be one of {IRREP_NORMALIZATIONS}, got {irrep_normalization!r}"
            )
        if path_normalization not in PATH_NORMALIZATIONS:
            raise ValueError(
                f"path_normalization must be one of {PATH_NORMALIZATIONS}, got {path_normalization!r}"
            )
        in1, in2, out = parse_irreps(irreps_in1), parse_irreps(irreps_in2), parse_irreps(irreps_out)
        raw = [tuple(ins) if len(ins) == 6 else (*tuple(ins), 1.0) for ins in instructions]
        for ins in raw:
            if len(ins) != 6:
                raise ValueError(
                    f"an instruction is (i_in1, i_in2, i_out, mode, has_weight[, path_weight]), got {ins}"
                )
            _check_mode(ins[3])
        in1_var = [1.0] * len(in1) if in1_var is None else [float(v) for v in in1_var]
        in2_var = [1.0] * len(in2) if in2_var is None else [float(v) for v in in2_var]
        out_var = [1.0] * len(out) if out_var is None else [float(v) for v in out_var]

        def num_elements(ins):
            i1, i2 = ins[0], ins[1]
            return {
                "uvw": in1[i1].mul * in2[i2].mul,
                "uvu": in2[i2].mul,
                "uvv": in1[i1].mul,
                "uuw": in1[i1].mul,
                "uuu": 1,
            }[ins[3]]

        normalised = []
        for ins in raw:
            i1, i2, io, mode, has_weight, path_weight = ins
            for index, blocks, name in (
                (i1, in1, "irreps_in1"),
                (i2, in2, "irreps_in2"),
                (io, out, "irreps_out"),
            ):
                if not 0 <= index < len(blocks):
                    raise ValueError(
                        f"instruction {ins} refers to block {index} of {name}, which has {len(blocks)} blocks"
                    )
            alpha = {"component": out[io].dim, "norm": in1[i1].dim * in2[i2].dim, "none": 1}[
                irrep_normalization
            ]
            if path_normalization == "element":
                x = sum(in1_var[o[0]] * in2_var[o[1]] * num_elements(o) for o in raw if o[2] == io)
            elif path_normalization == "path":
                x = in1_var[i1] * in2_var[i2] * num_elements(ins) * len([o for o in raw if o[2] == io])
            else:
                x = 1
            if x > 0.0:
                alpha /= x
            alpha *= out_var[io] * path_weight
            normalised.append(Instruction(i1, i2, io, mode, has_weight, math.sqrt(alpha)))
        return cls(
            irreps_string(in1),
            irreps_string(in2),
            irreps_string(out),
            tuple(normalised),
            irrep_normalization,
            path_normalization,
            "manual",
        )

    @classmethod
    def from_module(cls, module) -> TPDescriptor:
        """From an e3nn or a cuequivariance tensor-product module (ValueError/TypeError saying why not)."""
        if _is_cuequivariance_tp(module):
            return cls.from_cuequivariance(module)
        return cls.from_e3nn(module)

    @classmethod
    def from_e3nn(cls, module) -> TPDescriptor:
        """From an ``e3nn.o3.TensorProduct`` instance (its subclasses ``FullyConnectedTensorProduct``,
        ``ElementwiseTensorProduct``, ... included), reading its normalised instructions. Raises TypeError for
        other modules and for subclasses whose ``forward`` is not ``TensorProduct.forward`` (``TensorSquare``),
        ValueError for connection modes outside uvw/uvu/uvv/uuw/uuu."""
        try:
            from e3nn import o3
        except ImportError as error:
            raise TypeError(f"TPDescriptor.from_e3nn needs e3nn installed ({error})") from error
        if not isinstance(module, o3.TensorProduct):
            raise TypeError(f"expected an e3nn.o3.TensorProduct, got {type(module).__name__}")
        if type(module).forward is not o3.TensorProduct.forward:
            raise TypeError(
                f"{type(module).__name__} overrides TensorProduct.forward (it is not called as "
                "forward(x1, x2, weight)); not supported"
            )
        for ins in module.instructions:
            _check_mode(ins.connection_mode)
        return cls(
            str(module.irreps_in1),
            str(module.irreps_in2),
            str(module.irreps_out),
            tuple(
                Instruction(
                    ins.i_in1, ins.i_in2, ins.i_out, ins.connection_mode, ins.has_weight, ins.path_weight
                )
                for ins in module.instructions
            ),
        )

    @classmethod
    def from_cuequivariance(cls, module) -> TPDescriptor:
        """From ``cuequivariance_torch.ChannelWiseTensorProduct`` or ``FullyConnectedTensorProduct`` built with
        the ``mul_ir`` layout (cuequivariance's default, e3nn's layout), reading the coefficients of the module's
        own segmented polynomial, so the result is that module's function (its irreps group's basis and
        normalisation). A channel-wise product maps onto ``uvu`` when every block of the second input has
        multiplicity 1 (spherical harmonics), onto ``uvv`` when the first input's do; other multiplicities
        need e3nn's ``uvuv`` mode and raise ValueError."""
        if not _is_cuequivariance_tp(module):
            raise TypeError(
                "expected cuequivariance_torch.ChannelWiseTensorProduct or FullyConnectedTensorProduct, "
                f"got {type(module).__name__}"
            )
        import cuequivariance as cue

        kind = type(module).__name__
        for name, transpose, attribute in (
            ("layout_in1", module.transpose_in1, "source"),
            ("layout_in2", module.transpose_in2, "source"),
            ("layout_out", module.transpose_out, "target"),
        ):
            layout = getattr(transpose, attribute, None)
            if layout != cue.mul_ir:
                raise ValueError(f"{kind} with {name}={layout}: only the mul_ir layout (e3nn's) is supported")
        irreps = []
        for name in ("irreps_in1", "irreps_in2", "irreps_out"):
            value = getattr(module, name)
            group = getattr(getattr(value, "irrep_class", None), "__name__", "O3")
            if group != "O3":
                raise ValueError(f"{kind} over {group} irreps: only O3 irreps are supported")
            irreps.append(parse_irreps(value))
        in1, in2, out = irreps
        polynomial = getattr(getattr(module, "f", None), "_polynomial_orig", None)
        if polynomial is None:
            raise ValueError(f"{kind}: cannot read its segmented polynomial (cuequivariance_torch version?)")
        if len(polynomial.operations) != 1:
            raise ValueError(
                f"{kind}: expected one segmented tensor product, got {len(polynomial.operations)}"
            )
        operation, stp = polynomial.operations[0]
        if tuple(operation.buffers) != (0, 1, 2, 3):
            raise ValueError(f"{kind}: unexpected operand order {tuple(operation.buffers)}")
        subscripts = str(stp.subscripts)
        expected = {
            "ChannelWiseTensorProduct": "uv,iu,jv,kuv+ijk",
            "FullyConnectedTensorProduct": "uvw,iu,jv,kw+ijk",
        }
        if subscripts != expected[kind]:
            raise ValueError(f"{kind}: unexpected subscripts {subscripts!r}, expected {expected[kind]!r}")
        weight_segments = stp.operands[0].segments
        for blocks, operand, name in ((in1, 1, "irreps_in1"), (in2, 2, "irreps_in2"), (out, 3, "irreps_out")):
            shapes = [(b.dim, b.mul) for b in blocks]
            got = [(s[0], math.prod(s[1:])) for s in stp.operands[operand].segments]
            if shapes != got:
                raise ValueError(f"{kind}: segments of {name} {got} do not match its irreps {shapes}")
        instructions, used_weight_segments = [], []
        for path in stp.paths:
            sw, s1, s2, so = path.indices
            mul1, mul2 = in1[s1].mul, in2[s2].mul
            if kind == "FullyConnectedTensorProduct":
                mode = "uvw"
            elif mul2 == 1:
                mode = "uvu"
            elif mul1 == 1:
                mode = "uvv"
            else:
                raise ValueError(
                    f"{kind}: channel-wise path {in1[s1]} x {in2[s2]} -> {out[so]} needs e3nn's "
                    "'uvuv' mode (both multiplicities > 1); only uvu (second input multiplicity 1) "
                    "and uvv (first input multiplicity 1) are supported"
                )
            shape = tuple(weight_segments[sw])
            if math.prod(shape) != math.prod(weight_shape(mode, mul1, mul2, out[so].mul)):
                raise ValueError(
                    f"{kind}: weight segment {sw} of shape {shape} does not fit path {path.indices}"
                )
            coefficients = path.coefficients
            cg = tuple(
                (int(i), int(j), int(k), float(coefficients[i, j, k]))
                for i, j, k in zip(*coefficients.nonzero())
            )
            instructions.append((sw, Instruction(s1, s2, so, mode, True, 1.0, cg)))
            used_weight_segments.append(sw)
        if sorted(used_weight_segments) != list(range(len(weight_segments))):
            raise ValueError(f"{kind}: weight segments are not used once each ({used_weight_segments})")
        instructions.sort(key=lambda item: item[0])  # the weight vector's order
        return cls(
            irreps_string(in1),
            irreps_string(in2),
            irreps_string(out),
            tuple(ins for _, ins in instructions),
            None,
            None,
            "cuequivariance",
        )

    # ---- sizes ----

    @functools.cached_property
    def blocks_in1(self) -> tuple[Irrep, ...]:
        return parse_irreps(self.irreps_in1)

    @functools.cached_property
    def blocks_in2(self) -> tuple[Irrep, ...]:
        return parse_irreps(self.irreps_in2)

    @functools.cached_property
    def blocks_out(self) -> tuple[Irrep, ...]:
        return parse_irreps(self.irreps_out)

    @property
    def dim_in1(self) -> int:
        return sum(b.mul * b.dim for b in self.blocks_in1)

    @property
    def dim_in2(self) -> int:
        return sum(b.mul * b.dim for b in self.blocks_in2)

    @property
    def dim_out(self) -> int:
        return sum(b.mul * b.dim for b in self.blocks_out)

    def weight_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shape of each instruction's weight block (() for instructions without weights)."""
        return tuple(
            weight_shape(
                ins.mode,
                self.blocks_in1[ins.i_in1].mul,
                self.blocks_in2[ins.i_in2].mul,
                self.blocks_out[ins.i_out].mul,
            )
            if ins.has_weight
            else ()
            for ins in self.instructions
        )

    @property
    def weight_numel(self) -> int:
        return sum(
            math.prod(shape) for shape, ins in zip(self.weight_shapes(), self.instructions) if ins.has_weight
        )

    def tensors(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        """``(paths, cg_index, cg_value, cg_offsets)`` for the kernels (cached; do not modify them)."""
        return _tensors(self, dtype, torch.device(device))

    def __repr__(self) -> str:
        return (
            f"TPDescriptor({self.irreps_in1} x {self.irreps_in2} -> {self.irreps_out} | "
            f"{len(self.instructions)} instructions, {self.weight_numel} weights, source={self.source})"
        )

    # ---- checks ----

    def _validate(self) -> None:
        in1, in2, out = self.blocks_in1, self.blocks_in2, self.blocks_out
        for ins in self.instructions:
            _check_mode(ins.mode)
            for index, blocks, name in (
                (ins.i_in1, in1, "irreps_in1"),
                (ins.i_in2, in2, "irreps_in2"),
                (ins.i_out, out, "irreps_out"),
            ):
                if not 0 <= index < len(blocks):
                    raise ValueError(
                        f"instruction {tuple(ins[:5])} refers to block {index} of {name} "
                        f"({getattr(self, name)}), which has "
                        f"{len(blocks)} blocks"
                    )
            a, b, c = in1[ins.i_in1], in2[ins.i_in2], out[ins.i_out]
            where = f"instruction {tuple(ins[:5])} ({a} x {b} -> {c})"
            if ins.cg is None:
                if a.p * b.p != c.p:
                    raise ValueError(f"{where}: parity {a.p} x {b.p} cannot give {c.p}")
                if not abs(a.l - b.l) <= c.l <= a.l + b.l:
                    raise ValueError(f"{where}: l_out = {c.l} is outside |{a.l} - {b.l}| .. {a.l + b.l}")
            else:
                for i, j, k, _ in ins.cg:
                    if not (0 <= i < a.dim and 0 <= j < b.dim and 0 <= k < c.dim):
                        raise ValueError(
                            f"{where}: CG entry ({i}, {j}, {k}) outside ({a.dim}, {b.dim}, {c.dim})"
                        )
            rule = {
                "uvu": (a.mul == c.mul, "mul_in1 == mul_out"),
                "uvv": (b.mul == c.mul, "mul_in2 == mul_out"),
                "uuw": (a.mul == b.mul, "mul_in1 == mul_in2"),
                "uuu": (a.mul == b.mul == c.mul, "mul_in1 == mul_in2 == mul_out"),
            }.get(ins.mode)
            if rule is not None and not rule[0]:
                raise ValueError(f"{where}: mode {ins.mode} needs {rule[1]}")
            if ins.mode == "uvw" and not ins.has_weight:
                raise ValueError(f"{where}: mode uvw needs weights (e3nn requires has_weight=True)")
            if ins.mode == "uuw" and not ins.has_weight and c.mul != 1:
                raise ValueError(f"{where}: mode uuw without weights needs mul_out == 1 (as in e3nn)")


def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"connection mode {mode!r} is not supported; supported modes: {', '.join(MODES)}")


def _is_cuequivariance_tp(module) -> bool:
    import sys

    cuet = sys.modules.get("cuequivariance_torch")
    return cuet is not None and isinstance(
        module, (cuet.ChannelWiseTensorProduct, cuet.FullyConnectedTensorProduct)
    )


@functools.lru_cache(maxsize=16)
def _wigner_3j(l1: int, l2: int, l3: int) -> torch.Tensor:
    try:
        from e3nn.o3 import wigner_3j
    except ImportError as error:
        raise RuntimeError(
            "Clebsch–Gordan coefficients of e3nn descriptors come from e3nn.o3.wigner_3j; "
            f"install e3nn ({error})"
        ) from error
    return wigner_3j(l1, l2, l3, dtype=torch.float64)


@functools.lru_cache(maxsize=256)
def _tensors(descriptor: TPDescriptor, dtype: torch.dtype, device: torch.device):
    in1, in2, out = descriptor.blocks_in1, descriptor.blocks_in2, descriptor.blocks_out

    def offsets(blocks):
        result, offset = [], 0
        for b in blocks:
            result.append(offset)
            offset += b.mul * b.dim
        return result

    off1, off2, off_out = offsets(in1), offsets(in2), offsets(out)
    rows, index, value, counts = [], [], [], []
    w_off = 0
    for ins, shape in zip(descriptor.instructions, descriptor.weight_shapes()):
        a, b, c = in1[ins.i_in1], in2[ins.i_in2], out[ins.i_out]
        size = math.prod(shape) if ins.has_weight else 0
        this_w_off, w_off = w_off, w_off + size
        if a.mul == 0 or b.mul == 0 or c.mul == 0 or ins.path_weight == 0:
            continue  # contributes nothing (e3nn emits no code for it either)
        if ins.cg is None:
            C = _wigner_3j(a.l, b.l, c.l) * ins.path_weight
            nonzero = (C.abs() > _CG_TOLERANCE * max(abs(ins.path_weight), 1e-300)).nonzero().tolist()
            entries = [(i, j, k, C[i, j, k].item()) for i, j, k in nonzero]
        else:
            entries = [(i, j, k, v * ins.path_weight) for i, j, k, v in ins.cg if v != 0]
        if not entries:
            continue
        rows.append(
            [
                MODES.index(ins.mode),
                off1[ins.i_in1],
                a.mul,
                a.dim,
                off2[ins.i_in2],
                b.mul,
                b.dim,
                off_out[ins.i_out],
                c.mul,
                c.dim,
                this_w_off,
                int(ins.has_weight),
            ]
        )
        index += [e[:3] for e in entries]
        value += [e[3] for e in entries]
        counts.append(len(entries))
    paths = torch.tensor(rows, dtype=torch.int64).reshape(-1, 12)
    cg_index = torch.tensor(index, dtype=torch.int64).reshape(-1, 3)
    cg_value = torch.tensor(value, dtype=torch.float64).to(dtype)
    cg_offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
    return tuple(t.to(device) for t in (paths, cg_index, cg_value, cg_offsets))
