"""Helpers that drive the package through its public API (rounds, snapshots).

Expected values are never computed here: see ``reference.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import reference as ref
import torch
from torch import Tensor

from fedlora.core import Adapter, ClientUpdate, Factored, LoraSpec, get_aggregator

# Same-rank layouts: small, one square, one tall, one wide.
SHAPES = {"q": (12, 10), "v": (16, 16), "o": (24, 9)}
# Mixed-rank layouts: every module admits rank 16.
MIXED_SHAPES = {"q": (24, 20), "v": (16, 16), "fc": (20, 32)}
MIXED_RANKS = [2, 4, 8, 16]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def trained(
    start_adapters: Mapping[str, Adapter], g: torch.Generator, train_A: bool = True, noise: float = 0.3, train_B: bool = True, train_core: bool = False
) -> dict[str, Adapter]:
    """A client's local training, simulated: new tensors B + noise (and A + noise if trained).
    With ``train_core`` (Fed-SB) B moves only within the column space of the B it started from."""
    out = {}
    for name, a in start_adapters.items():
        step = noise * torch.randn(a.B.shape, generator=g, dtype=a.B.dtype)
        if train_core:
            Q = torch.linalg.qr(a.B.double())[0]
            step = (Q @ (Q.T @ step.double())).to(a.B.dtype)
        B = a.B + step if train_B else a.B.clone()
        A = a.A + noise * torch.randn(a.A.shape, generator=g, dtype=a.A.dtype) if train_A else a.A.clone()
        out[name] = Adapter(B, A, a.scale)
    return out


@dataclasses.dataclass
class Round:
    starts: list
    updates: list
    new: object
    ranks: list
    ns: list


def client_round(agg, state, ranks: Sequence[int | None], ns: Sequence[int], seed: int, ids: Sequence[str] | None = None, noise: float = 0.3):
    """Starts and updates of one round (no aggregation)."""
    g = gen(seed)
    ids = list(ids) if ids is not None else [f"c{i}" for i in range(len(ranks))]
    starts, updates = [], []
    for cid, r, n in zip(ids, ranks, ns):
        start = agg.client_start(state, r) if r is not None else agg.client_start(state)
        starts.append(start)
        updates.append(ClientUpdate(cid, n, trained(start.adapters, g, start.train_A, noise, start.train_B, start.train_core)))
    return starts, updates


def run_round(agg, state, ranks, ns, seed, ids=None, noise=0.3) -> Round:
    starts, updates = client_round(agg, state, ranks, ns, seed, ids, noise)
    new = agg.aggregate(state, updates)
    return Round(starts, updates, new, [u.adapters[next(iter(u.adapters))].rank for u in updates], list(ns))


def fdense(f: Factored) -> Tensor:
    """A package Factored read as a dense float64 matrix with our own product."""
    return ref.mat(f.L, f.R)


def client_effective_delta(start, update, name: str) -> Tensor:
    """ΔW_i = client start's (client-only) base_delta + s_i·B_i·A_i, dense float64."""
    a = update.adapters[name]
    D = ref.product(a.B, a.A, a.scale)
    if name in start.base_delta:
        D = D + fdense(start.base_delta[name])
    return D


def global_after(agg, new, name: str) -> Tensor:
    """new.base_delta + G(new): the aggregate's total change on top of the old folded base."""
    G = fdense(agg.global_delta(new)[name])
    if name in new.base_delta:
        G = G + fdense(new.base_delta[name])
    return G


# ------------------------------------------------------------------ snapshots
def tensors_of(obj, path="state") -> dict[str, Tensor]:
    """Every tensor reachable from obj (mappings, sequences, dataclasses, Factored)."""
    out: dict[str, Tensor] = {}
    if isinstance(obj, Tensor):
        out[path] = obj
    elif isinstance(obj, Factored):
        out[path + ".L"] = obj.L
        out[path + ".R"] = obj.R
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            out.update(tensors_of(getattr(obj, f.name), f"{path}.{f.name}"))
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(tensors_of(v, f"{path}[{k!r}]"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors_of(v, f"{path}[{i}]"))
    return out


def snapshot(state) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in tensors_of(state).items()}


def assert_unchanged(state, snap: dict[str, Tensor]) -> None:
    """Every tensor of ``state`` is bit-for-bit what ``snap`` recorded (dtype, shape and bytes)."""
    now = tensors_of(state)
    assert set(now) == set(snap)
    for k, v in snap.items():
        t = now[k]
        assert t.dtype == v.dtype and t.shape == v.shape, k
        if t.numel():
            assert torch.equal(t.contiguous().reshape(-1).view(torch.uint8), v.contiguous().reshape(-1).view(torch.uint8)), f"{k} changed"


def make(name: str, shapes=SHAPES, rank=4, alpha=8.0, rslora=False, seed=0, dense=None, **opts):
    agg = get_aggregator(name, **opts)
    state = agg.init_state(shapes, rank, LoraSpec(alpha, rslora), dense=dense, seed=seed)
    return agg, state
