"""The factored SVD's two routes at LLaMA-7B module shapes, in the same run: the Gram route
(eigendecomposition of LᵀL and RRᵀ in float64, the default) against Householder QR of both
factors (the fallback). Inner dimension k = K·r + r for K clients at rank r (fedex's residual,
FlexLoRA's and FRA's stacks), random factors (full numerical rank: the worst case).

    python benchmarks/svd_routes.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.core import Factored


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print("| module m×n | k | Gram route s | QR route s | QR ÷ Gram | max relative difference of the product |")
    print("|---|---|---|---|---|---|")
    for m, n in ((4096, 4096), (11008, 4096)):
        for k in (176, 352):
            M = Factored(torch.randn(m, k, generator=g) / k**0.5, torch.randn(k, n, generator=g) / n**0.5)
            gram = best_of(M.svd, args.repeats)
            qr = best_of(lambda M=M: M._qr_svd(None, None), args.repeats)
            a, b = M.svd(), M._qr_svd(None, None)
            pa, pb = (a.U * a.S) @ a.Vh, (b.U * b.S) @ b.Vh  # m×n, here only to check the two agree
            diff = float((pa - pb).norm() / pb.norm())
            print(f"| {m}×{n} | {k} | {gram:.3f} | {qr:.3f} | {qr / gram:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
