"""``fedlora bench base-delta``: the cost of keeping base deltas beside W0 (``model.base_delta=factored``)
against folding them into W0 (``fold``), round after round, on one or more layers of a preset's shapes.

Each round brings every module a random ΔW0_t of inner dimension ``--delta-rank`` (fedex's
residual ships with inner dimension (K−1)·r, 144 for 10 clients at r = 16; HEXA's svd restarts
K·r + r = 176, the default). Random factors
have full numerical rank, so the side grows by the whole ``--delta-rank`` each round: the worst
case for the factored store. Per round it reports the time to take the delta in each mode, the
side's inner dimension (or "dense" once it holds a dense matrix beside a quantized W0), its
memory against W0's, and a forward pass of ``--tokens`` tokens through every module, W0 alone
against W0 plus the side, measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ..core import Factored
from ..models.base_delta import BaseDeltas
from .aggregation import PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=list(PRESETS), default="llama-7b")
    p.add_argument("--layers", type=int, default=1, help="transformer layers of the preset (modules = layers × modules per layer)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--delta-rank", type=int, default=176, help="inner dimension of each round's ΔW0 per module")
    p.add_argument("--tokens", type=int, default=64, help="tokens in the timed forward pass")
    p.add_argument("--quantized", action="store_true", help="treat W0 as quantized: a full side turns into a dense side matrix, never a fold")
    p.add_argument("--threads", type=int, default=0)


def _layers(preset: str, layers: int) -> dict[str, nn.Linear]:
    out = {}
    for i in range(layers):
        for name, (m, n) in PRESETS[preset]["modules"].items():
            lin = nn.Linear(n, m, bias=False)
            lin.weight.requires_grad_(False)
            out[f"{i}.{name}"] = lin
    return out


def _forward_s(layers: dict[str, nn.Linear], x: dict[int, torch.Tensor], repeats: int = 3) -> float:
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for lin in layers.values():
                lin(x[lin.in_features])
            best = min(best, time.perf_counter() - t0)
    return best


def main(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fold_layers, side_layers = _layers(args.preset, args.layers), _layers(args.preset, args.layers)
    for a, b in zip(fold_layers.values(), side_layers.values()):
        b.weight.data.copy_(a.weight.data)
    folded = BaseDeltas(fold_layers, dict.fromkeys(fold_layers, False), "fold")
    side = BaseDeltas(side_layers, dict.fromkeys(side_layers, False), "factored")
    if args.quantized:
        side.quantized = set(side_layers)  # the dense-side path of a quantized W0, on float weights
    w_numel = sum(lin.weight.numel() for lin in side_layers.values())
    x = {n: torch.randn(args.tokens, n) for n in {lin.in_features for lin in side_layers.values()}}
    base_fwd = _forward_s(fold_layers, x)
    print(
        f"{args.preset}: {len(side_layers)} modules ({args.layers} layer(s)), ΔW0 of inner dimension {args.delta_rank} per module and round, "
        f"{args.tokens}-token forward; torch threads {torch.get_num_threads()}"
    )
    print("| round | fold s | factored s | side inner dim | side numbers ÷ W0 | forward W0 s | forward W0 + side s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    for t in range(1, args.rounds + 1):
        deltas = {
            k: Factored(torch.randn(lin.out_features, args.delta_rank, generator=g) * 1e-3, torch.randn(args.delta_rank, lin.in_features, generator=g))
            for k, lin in side_layers.items()
        }
        t0 = time.perf_counter()
        folded.fold(deltas)
        t1 = time.perf_counter()
        side.fold(deltas)
        t2 = time.perf_counter()
        ranks = {s.L.shape[1] if s.L is not None else "dense" for s in side.sides.values()} or {0}
        fwd = _forward_s(side_layers, x)
        print(
            f"| {t} | {t1 - t0:.2f} | {t2 - t1:.2f} | {'/'.join(map(str, sorted(ranks, key=str)))} | {side.side_numel() / w_numel:.3f} | "
            f"{base_fwd:.3f} | {fwd:.3f} | {fwd / base_fwd:.2f} |"
        )
    return 0
