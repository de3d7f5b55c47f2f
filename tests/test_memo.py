"""fastflow.memo.TensorMemo: a value is computed once per (tensors, key) and again only when a tensor is modified in
place, another tensor object takes its place, or the key changes; a compute that raises stores nothing."""

import gc

import pytest
import torch

from fastflow.memo import TensorMemo, readable


def test_computed_once_then_again_after_a_change():
    memo, calls = TensorMemo(), []
    a, b = torch.arange(4), torch.ones(3)

    def compute():
        calls.append(1)
        return a.sum().item() + b.sum().item()

    assert memo.get((a, b), compute) == 9 and memo.get((a, b), compute) == 9 and len(calls) == 1
    b.add_(1)  # in place: the version counter moves
    assert memo.get((a, b), compute) == 12 and len(calls) == 2
    assert memo.get((a, b), compute, key="other") == 12 and len(calls) == 3  # another key: its own value
    c = b.clone()  # equal values, another object
    assert memo.get((a, c), compute) == 12 and len(calls) == 4


def test_a_reused_id_is_not_mistaken_for_the_same_tensor():
    memo = TensorMemo()
    first = torch.zeros(2)
    second = torch.zeros(2)
    memo.get((first, second), lambda: "for the first pair")
    del second
    gc.collect()
    for _ in range(100):  # a new tensor may get the freed id; the weak reference tells them apart
        third = torch.zeros(2)
        assert memo.get((first, third), lambda: "recomputed") == "recomputed"


def test_a_failing_compute_stores_nothing():
    memo = TensorMemo()
    a = torch.zeros(1)

    def fail():
        raise ValueError("bad plan")

    with pytest.raises(ValueError, match="bad plan"):
        memo.get((a,), fail)
    assert memo.get((a,), lambda: "fine") == "fine"


def test_entries_die_with_their_first_tensor():
    memo = TensorMemo()
    a = torch.zeros(1)
    memo.get((a,), lambda: 1)
    assert len(memo._entries) == 1
    del a
    gc.collect()
    assert len(memo._entries) == 0


def test_readable():
    assert readable(torch.zeros(1))
    assert not readable(torch.zeros(1, device="meta"))
