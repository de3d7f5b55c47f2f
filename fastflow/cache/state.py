"""Per-trajectory cache state: which batch it is, and each molecule's last K evaluations with their clock values
(solver times, or step indices for ``CacheConfig.clock="steps"``)."""

from __future__ import annotations

import torch


class TrajectoryState:
    """One batch's trajectory. history[i] ``[K, B, ...]`` holds output i's last K evaluations of each molecule,
    newest first, at clock values ``times[:, b]`` (float64: solver times, or step indices with clock="steps";
    ``last_t`` is always the last solver time, which tells a new trajectory from this one); rows are shifted per
    molecule, so molecules evaluated at different steps keep their own histories. History is fp32 (fp64 for
    fp64 models), whatever the model dtype, and stored by value (immune to in-place changes of the model's
    buffers)."""

    def __init__(self, signature: tuple, mask: torch.Tensor, mol_index: torch.Tensor, capacity: int):
        B = mask.size(0)
        self.signature, self.mask, self.mol_index, self.capacity = (
            signature,
            mask.clone(),
            mol_index,
            capacity,
        )
        self.calls = 0
        self.last_t = None
        self.times = torch.full((capacity, B), float("nan"), dtype=torch.float64)
        self.n_stored = torch.zeros(B, dtype=torch.long)
        self.forecasts_in_a_row = torch.zeros(B, dtype=torch.long)
        self.calibration = torch.ones(B, dtype=torch.float64)
        self.history: list[torch.Tensor] = []
        self.structure = None  # the output container: None for one tensor, else the tuple length

    def continues(
        self, signature: tuple, mask: torch.Tensor, mol_index: torch.Tensor, t: torch.Tensor
    ) -> bool:
        """Same batch and time moves forward: otherwise the call starts a new trajectory."""
        return (
            signature == self.signature
            and torch.equal(mask, self.mask)
            and torch.equal(mol_index, self.mol_index)
            and bool((t > self.last_t).all())
        )

    def store(self, rows: torch.Tensor, outputs: list[torch.Tensor], t: torch.Tensor) -> None:
        """Push the evaluations ``outputs[i]`` ``[len(rows), ...]`` of molecules ``rows`` at clock values t ``[B]``."""
        if not self.history:
            B = self.mask.size(0)
            self.history = [
                out.new_zeros(
                    (self.capacity, B) + out.shape[1:], dtype=torch.promote_types(out.dtype, torch.float32)
                )
                for out in outputs
            ]
        for history, out in zip(self.history, outputs):
            history[1:, rows] = history[:-1, rows]
            history[0, rows] = out.to(history.dtype)
        self.times[1:, rows] = self.times[:-1, rows]
        self.times[0, rows] = t[rows]
        self.n_stored[rows] = (self.n_stored[rows] + 1).clamp(max=self.capacity)
        self.forecasts_in_a_row[rows] = 0
