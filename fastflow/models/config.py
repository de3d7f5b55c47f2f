"""`SemlaConfig`: the hyper-parameters of a Semla generator, with presets and upstream hparam mapping."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastflow.chem.vocab import N_ATOM_TYPES, N_BOND_TYPES, QM9_COORD_STD

COORD_NORMS = ("length", "gvp", "none")


@dataclass(frozen=True)
class SemlaConfig:
    """Hyper-parameters of :class:`fastflow.models.Semla` (names as upstream SemlaFlow's ``train.py``).

    Letters of the notes: D ``d_model``, M ``d_message``, E ``d_edge``, S ``n_coord_sets``, H ``n_attn_heads``.
    ``coord_std`` is the dataset coordinate standard deviation (Å) the model was trained with: the sampler
    multiplies predictions by it.
    """

    d_model: int = 384
    n_layers: int = 12
    d_message: int = 128
    d_message_hidden: int = 128
    d_edge: int = 128
    n_coord_sets: int = 64
    n_attn_heads: int = 32
    coord_norm: str = "length"
    size_emb: int = 64
    max_atoms: int = 256
    self_cond: bool = True
    bond_refine: bool = True
    vocab_size: int = N_ATOM_TYPES
    n_edge_types: int = N_BOND_TYPES
    eps: float = 1e-6
    coord_std: float = QM9_COORD_STD
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        positive = (
            "d_model",
            "n_layers",
            "d_message",
            "d_message_hidden",
            "d_edge",
            "n_coord_sets",
            "n_attn_heads",
            "size_emb",
            "max_atoms",
            "vocab_size",
            "n_edge_types",
        )
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SemlaConfig.{key} must be a positive int, got {value!r}")
        if self.d_model % self.n_attn_heads:
            raise ValueError(
                f"SemlaConfig: n_attn_heads={self.n_attn_heads} must divide d_model={self.d_model}"
            )
        if self.n_layers < 2:
            raise ValueError(
                f"SemlaConfig.n_layers must be >= 2 (an edge-in and an edge-out layer), got {self.n_layers}"
            )
        if self.coord_norm not in COORD_NORMS:
            raise ValueError(f"SemlaConfig.coord_norm must be one of {COORD_NORMS}, got {self.coord_norm!r}")
        if not (self.coord_std > 0):
            raise ValueError(f"SemlaConfig.coord_std must be > 0, got {self.coord_std!r}")

    @property
    def n_atom_feats(self) -> int:
        """Width of the invariant input: the time t plus the one-hot atom type."""
        return self.vocab_size + 1

    @classmethod
    def preset(cls, name: str, **overrides) -> SemlaConfig:
        """A named configuration: ``semlaflow`` (the 23.3 M-parameter default), ``small`` (CPU training), ``tiny`` (tests)."""
        if name not in PRESETS:
            raise ValueError(f"unknown SemlaConfig preset {name!r}; known presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], name=name, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SemlaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SemlaConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> SemlaConfig:
        """Build a config from the ``hyper_parameters`` stored in an upstream SemlaFlow Lightning checkpoint."""
        arch = hparams.get("architecture") or "semla"
        if arch != "semla":
            raise ValueError(f"checkpoint architecture is {arch!r}; fastflow loads only 'semla' generators")
        required = ("d_model", "d_message", "n_coord_sets", "n_layers", "n_attn_heads", "d_edge")
        missing = [key for key in required if hparams.get(key) is None]
        if missing:
            raise ValueError(f"checkpoint hyper_parameters lack {missing}: not a SemlaFlow Semla checkpoint")
        strategy = hparams.get("integration-type-strategy", "uniform-sample")
        n_edge_types = hparams.get("n_edge_types") or (
            N_BOND_TYPES + 1 if strategy == "mask" else N_BOND_TYPES
        )
        config = cls(
            d_model=int(hparams["d_model"]),
            n_layers=int(hparams["n_layers"]),
            d_message=int(hparams["d_message"]),
            # upstream's core layers use d_message_hidden; None there means "the layer's output width"
            d_message_hidden=int(hparams.get("d_message_hidden") or hparams["d_message"]),
            d_edge=int(hparams["d_edge"]),
            n_coord_sets=int(hparams["n_coord_sets"]),
            n_attn_heads=int(hparams["n_attn_heads"]),
            coord_norm=hparams.get("coord_norm", "length"),
            size_emb=int(hparams.get("size_emb", 64)),
            max_atoms=int(hparams.get("max_atoms", 256)),
            self_cond=bool(hparams.get("self_cond", hparams.get("self_condition", False))),
            bond_refine=bool(hparams.get("bond_refine", True)),
            vocab_size=int(hparams.get("vocab_size", N_ATOM_TYPES)),
            n_edge_types=int(n_edge_types),
            eps=float(hparams.get("eps", 1e-6)),
            coord_std=float(hparams.get("coord_scale", QM9_COORD_STD)),
            name="semlaflow-checkpoint",
        )
        n_atom_feats = hparams.get("n_atom_feats")
        if n_atom_feats is not None and int(n_atom_feats) != config.n_atom_feats:
            raise ValueError(
                f"checkpoint n_atom_feats={n_atom_feats} but vocab_size+1={config.n_atom_feats}: "
                "only the time + one-hot type input of SemlaFlow is supported"
            )
        return config


PRESETS: dict[str, SemlaConfig] = {
    # SemlaFlow's defaults (train.py): 23.3 M parameters.
    "semlaflow": SemlaConfig(),
    # Trainable on a 2-core CPU in hours; same architecture, narrower and shallower.
    "small": SemlaConfig(
        d_model=128,
        n_layers=6,
        d_message=64,
        d_message_hidden=64,
        d_edge=64,
        n_coord_sets=16,
        n_attn_heads=16,
        size_emb=32,
        max_atoms=64,
    ),
    # For tests: every code path, milliseconds per forward.
    "tiny": SemlaConfig(
        d_model=32,
        n_layers=3,
        d_message=16,
        d_message_hidden=16,
        d_edge=16,
        n_coord_sets=4,
        n_attn_heads=4,
        size_emb=8,
        max_atoms=64,
    ),
}
