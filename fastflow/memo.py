"""Values derived from tensors, computed once and reused while those exact tensors live unmodified.

Descriptors, plans and weights reach the ops as the same buffers on every call. What is derived from their values
(a descriptor's extents, a plan's checks, regrouped kernel tables, bf16 copies of weights) is worth computing once:
per call it would cost host work, and on a GPU a device sync. ``TensorMemo.get(tensors, compute, key)`` returns
``compute()``'s value from an earlier call with the same tensor objects (held by weak reference and compared by
identity: a bare ``id()`` can be reused after garbage collection), the same version counters (an in-place change
recomputes) and the same ``key`` (dtype, device, sizes the value depends on). Entries die with their first tensor.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary


class TensorMemo:
    def __init__(self):
        self._entries = (
            WeakIdKeyDictionary()
        )  # first tensor -> {key: (weak refs of the others, versions, value)}

    def get(self, tensors: Sequence[torch.Tensor], compute: Callable[[], Any], key: Hashable = ()) -> Any:
        first, others = tensors[0], tuple(tensors[1:])
        versions = tuple(t._version for t in tensors)
        slots = self._entries.setdefault(first, {})
        cached = slots.get(key)
        if cached is not None:
            refs, cached_versions, value = cached
            if cached_versions == versions and all(ref() is t for ref, t in zip(refs, others)):
                return value
        value = compute()  # raises before anything is stored
        slots[key] = (tuple(weakref.ref(t) for t in others), versions, value)
        return value


def readable(tensor: torch.Tensor) -> bool:
    """Whether the values of ``tensor`` can be read (for a check or a memo): not for fake or meta tensors
    (tracing, fake kernels) nor while torch.compile traces."""
    return (
        not torch.compiler.is_compiling()
        and tensor.device.type != "meta"
        and not torch._subclasses.fake_tensor.is_fake(tensor)
    )
