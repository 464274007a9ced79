"""Modules aggregated side by side (core/parallel.py): the same result as one at a time, the
first failing module named, torch's thread setting restored.

The rest of the suite runs with one torch thread (conftest), where modules run one after the
other; here torch gets two threads, so the thread pool does the work."""

import pytest
import torch
from helpers import MIXED_RANKS, MIXED_SHAPES, make, run_round, snapshot, tensors_of

from fedlora.core import Adapter, ClientUpdate, UpdateError, available_methods
from fedlora.core.parallel import per_module

# Enough modules that both workers get several.
SHAPES = {f"layer{i}.{m}": shape for i in range(4) for m, shape in {"q": (12, 10), "v": (16, 16), "o": (24, 9)}.items()}
MIXED = {f"layer{i}.{m}": shape for i in range(3) for m, shape in MIXED_SHAPES.items()}


def two_rounds(name: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    try:
        if name in ("hexa", "fedhl", "flexlora", "hetlora", "flora"):
            agg, state = make(name, shapes=MIXED, rank=16)
            ranks = MIXED_RANKS
        else:
            agg, state = make(name, shapes=SHAPES, rank=4)
            ranks = [None] * 4
        ns = [30, 10, 50, 20]
        first = run_round(agg, state, ranks, ns, seed=1).new
        second = run_round(agg, first, ranks, ns, seed=2).new
        return snapshot(second)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("name", available_methods())
def test_modules_side_by_side_give_the_bits_of_one_at_a_time(name):
    alone, side_by_side = two_rounds(name, 1), two_rounds(name, 2)
    assert set(alone) == set(side_by_side)
    for key, t in alone.items():
        assert torch.equal(t, side_by_side[key]), key
    assert torch.get_num_threads() == 1


def test_the_first_failing_module_in_order_is_reported_and_threads_are_restored():
    agg, state = make("ffa", shapes=SHAPES, rank=4)
    updates = []
    for i, bad in enumerate(["layer3.o", "layer1.v"]):  # client 0 moves a later module's A than client 1
        start = agg.client_start(state)
        adapters = dict(start.adapters)
        a = adapters[bad]
        adapters[bad] = Adapter(a.B + 1.0, a.A + 1.0, a.scale)
        updates.append(ClientUpdate(f"c{i}", 10, adapters))
    before = snapshot(state)
    torch.set_num_threads(2)
    try:
        with pytest.raises(UpdateError) as e:
            agg.aggregate(state, updates)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    # Modules are checked in the state's order: layer1.v comes before layer3.o, whichever client moved it.
    assert e.value.client == "c1" and e.value.module == "layer1.v"
    now = tensors_of(state)
    assert all(torch.equal(now[k], v) for k, v in before.items())


def test_per_module_runs_every_module_once_on_one_torch_thread_each():
    seen = []

    def work(name: str) -> tuple[str, int]:
        seen.append(name)
        return name.upper(), torch.get_num_threads()

    torch.set_num_threads(2)
    try:
        out = per_module(work, ["a", "b", "c"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert out == {"a": ("A", 1), "b": ("B", 1), "c": ("C", 1)} and list(out) == ["a", "b", "c"]
    assert sorted(seen) == ["a", "b", "c"]
