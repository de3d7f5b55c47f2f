"""The one place the sampling loop calls the network: ``step_fn(model, state, cond) -> Prediction``.

The default :func:`model_step` runs the model once on the whole batch; a custom step function (``step_fn=`` of
:func:`fastflow.sampling.sample`) may compute the prediction another way and says how many molecule evaluations
it spent in ``Prediction.nfe``. Everything a step function may need is in :class:`FlowState` — the solver time,
the step index and count (to force the last step, which *is* the sample), and the request indices of the
molecules.

Caches do not replace the step function: ``fastflow.patch_model`` installs them inside the model, where they
see only the model's inputs. :func:`model_step` therefore publishes the step as a neutral
:class:`~fastflow.step_record.StepRecord` around the model call, and reads back the evaluations the cache
really spent.

Shapes: B molecules, N atoms (padded), V atom tokens, K bond classes, C charge classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastflow.step_record import StepRecord, publish_step


@dataclass
class FlowState:
    """Integration state x_t of one batch, in model units (coordinates divided by the coordinate scale).

    coords ``[B,N,3]``; atomics ``[B,N,V]`` one-hot; bonds ``[B,N,N,K]`` one-hot; mask ``[B,N]`` bool (real
    atoms); t ``[B]`` (the model's dtype); step k and n_steps (the model is called for k = 0 … n_steps − 1);
    mol_index ``[B]`` the molecules' indices in the request; t_next ``[B]`` the time after this step (None after
    the last one), so that multistep forecasters integrate over the real step. Padding atoms and pairs hold zeros
    (all-zero one-hots).
    """

    coords: torch.Tensor
    atomics: torch.Tensor
    bonds: torch.Tensor
    mask: torch.Tensor
    t: torch.Tensor
    step: int
    n_steps: int
    mol_index: torch.Tensor
    t_next: torch.Tensor | None = None


@dataclass
class SelfCond:
    """Self-conditioning inputs: the previous step's x̂₁ ``[B,N,3]`` and softmaxed types ``[B,N,V]`` and bonds
    ``[B,N,N,K]``; zeros at the first step."""

    coords: torch.Tensor
    atomics: torch.Tensor
    bonds: torch.Tensor


@dataclass
class Prediction:
    """Network output: x̂₁ ``[B,N,3]`` (model units), type ``[B,N,V]``, bond ``[B,N,N,K]`` and charge
    ``[B,N,C]`` logits; nfe = molecule evaluations of the network spent on it (B for a full call, 0 for a
    forecast)."""

    coords: torch.Tensor
    type_logits: torch.Tensor
    bond_logits: torch.Tensor
    charge_logits: torch.Tensor
    nfe: int


StepFn = Callable[[nn.Module, FlowState, SelfCond | None], Prediction]


def model_step(model: nn.Module, state: FlowState, cond: SelfCond | None) -> Prediction:
    """Call a SemlaGenerator-style model once on the whole batch: ``model(coords, cat(t, atomics),
    edge_feats=bonds, cond_coords=, cond_atomics=, cond_bonds=, atom_mask=)``."""
    t = state.t.view(-1, 1, 1).expand(-1, state.coords.size(1), 1)
    inv_feats = torch.cat((t, state.atomics), dim=-1)
    record = StepRecord(state.step, state.n_steps, state.t, state.t_next, state.mol_index, nfe=len(state.t))
    with publish_step(record):
        coords, type_logits, bond_logits, charge_logits = model(
            state.coords,
            inv_feats,
            edge_feats=state.bonds,
            cond_coords=None if cond is None else cond.coords,
            cond_atomics=None if cond is None else cond.atomics,
            cond_bonds=None if cond is None else cond.bonds,
            atom_mask=state.mask,
        )
    return Prediction(coords, type_logits, bond_logits, charge_logits, nfe=record.nfe)
