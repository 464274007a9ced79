"""What client-level DP noise does to each method's aggregate, and how much of it FRA's rank-r
truncation removes (BENCHMARKS.md "Client-level DP: where the noise goes").

One module of shape m×n, K clients all sampled (q = 1, D = K), rank r. Each client's update is a
shared rank-r direction plus its own variation (B_i = B_sig·(1 + 0.3·ε_i) + 0.1·noise, and for
methods that train A, A_i = A + 0.1·noise); C is the median of the update norms in the
method's space, so clipping binds for half the clients. For every method with a client-level
mechanism (fedit: factors, ffa: B, fra: dense + top-r SVD, fedex: dense, exact) the private
aggregate is computed twice with the same clipping, with noise multiplier z and with z = 0, and
the script prints

  rel_err   ‖G_z − G_0‖_F / ‖G_0‖_F, G the module's effective update (s·B·A + base delta);
  kept      ‖G_z − G_0‖_F² / E‖ξ/D‖_F² for the dense spaces: the share of the noise's energy
            that stays in the model (FedEx keeps all of it; a fixed rank-r subspace would keep
            r/min(m, n); FRA's subspace is chosen by the noisy matrix itself, so it keeps more).

Usage: python benchmarks/dp_noise.py [--shape 384] [--rank 8] [--clients 100] [--z 0.1,0.3,1] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fedlora.core import Adapter, ClientUpdate, LoraSpec, get_aggregator
from fedlora.core.privacy import ClientDP, private_aggregate, update_norm


def updates_for(agg, state, K: int, g: torch.Generator) -> list[ClientUpdate]:
    start = agg.client_start(state)
    out = []
    for i in range(K):
        adapters = {}
        for name, a in start.adapters.items():
            m, r = a.B.shape
            sig = torch.randn(m, r, generator=torch.Generator().manual_seed(1000 + hash(name) % 1000))  # shared by every client
            B = a.B + sig * (1 + 0.3 * torch.randn((), generator=g)) + 0.1 * torch.randn(m, r, generator=g)
            A = a.A + 0.1 * torch.randn(a.A.shape, generator=g) if start.train_A else a.A.clone()
            adapters[name] = Adapter(B, A, a.scale)
        out.append(ClientUpdate(f"c{i}", 100, adapters))
    return out


def effective(agg, state, name: str) -> torch.Tensor:
    G = agg.global_delta(state)[name].dense(torch.float64)
    if name in state.base_delta:
        G = G + state.base_delta[name].dense(torch.float64)
    return G


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, default=384)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--z", default="0.1,0.3,1")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    m = n = args.shape
    zs = [float(x) for x in args.z.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    print(f"module {m}×{n}, rank {args.rank}, {args.clients} clients (q = 1), C = median update norm; mean over seeds {seeds}")
    print(f"a fixed rank-{args.rank} subspace holds {args.rank / min(m, n):.4f} of isotropic noise's energy")
    print(f"{'method':<7} {'space':<12} {'z':>5} {'rel_err':>10} {'kept':>8}")
    for method in ("fedit", "ffa", "fra", "fedex"):
        agg = get_aggregator(method, **({"fra_rounds": 10**6} if method == "fra" else {}))
        for z in zs:
            errs, kept = [], []
            for seed in seeds:
                state = agg.init_state({"q": (m, n)}, args.rank, LoraSpec(alpha=2 * args.rank), seed=seed)
                ups = updates_for(agg, state, args.clients, torch.Generator().manual_seed(seed))
                space = agg.dp_space(state)
                clip = statistics.median(update_norm(space, state, u) for u in ups)
                runs = {}
                for zz in (z, 0.0):
                    dp = ClientDP(clip=clip, noise_multiplier=zz, denominator=float(args.clients))
                    runs[zz] = private_aggregate(agg, state, ups, dp, torch.Generator().manual_seed(seed + 7))
                Gz, G0 = effective(agg, runs[z], "q"), effective(agg, runs[0.0], "q")
                errs.append(float(torch.linalg.norm(Gz - G0) / torch.linalg.norm(G0)))
                expected = (z * clip / args.clients) ** 2 * m * n  # E‖ξ/D‖_F² of a dense noise matrix
                kept.append(float(torch.linalg.norm(Gz - G0) ** 2) / expected)
            dense = space in ("dense", "dense_exact")
            print(f"{method:<7} {space:<12} {z:>5g} {statistics.mean(errs):>10.4f} {statistics.mean(kept) if dense else float('nan'):>8.4f}")


if __name__ == "__main__":
    main()
