"""One benchmark row, run in its own process: a synthetic round of one method,
timed against the dense computation it avoids, with its error and memory.

The round is built exactly as a real one: ``init_state`` → ``client_start``
for each client → the client perturbs B and A (A only if ``train_A``) →
``aggregate``. Everything stays factored and float32 (LLaMA-7B shapes, K=10,
r=16: about 1.6 GB of client factors); dense m×n matrices are formed only for
the few modules timed or checked densely, one module at a time.
"""

from __future__ import annotations

import cProfile
import gc
import math
import pstats
from time import perf_counter, process_time

import torch
from torch import Tensor

from ..core import Adapter, ClientStart, ClientUpdate, LoraSpec, fold_delta, get_aggregator
from ._memory import PeakRSS

# Perturbation sizes of a simulated local step, relative to peft's init scale.
B_STEP, A_STEP = 1e-3, 0.1


def make_updates(agg, state, ranks, gen: torch.Generator, keep) -> tuple[list[ClientUpdate], list[ClientStart]]:
    """Each client's update from its real ``client_start``; the starts are kept for modules in ``keep``."""
    updates, starts = [], []
    for i, rank in enumerate(ranks):
        start = agg.client_start(state, rank)
        adapters = {}
        for name, a in start.adapters.items():
            m, n = a.shape
            step = B_STEP * torch.randn(m, a.rank, generator=gen)
            if start.train_core:  # Fed-SB: B moves only inside the column space it was sent
                Q = torch.linalg.qr(a.B)[0]
                step = Q @ (Q.T @ step)
            B = a.B + step if start.train_B else a.B
            A = a.A + (A_STEP / math.sqrt(n)) * torch.randn(a.rank, n, generator=gen) if start.train_A else a.A
            adapters[name] = Adapter(B, A, a.scale)
        n_i = int(torch.randint(50, 500, (1,), generator=gen))
        updates.append(ClientUpdate(f"client{i}", n_i, adapters))
        starts.append(ClientStart({k: start.adapters[k] for k in keep}, {k: v for k, v in start.base_delta.items() if k in keep}))
    return updates, starts


def client_terms(updates, starts, name: str, w) -> tuple[list[Tensor], list[Tensor]]:
    """Factors of Σ_i w_i·ΔW_i, ΔW_i = s_i·B_i·A_i (+ the client-only frozen base delta, HEXA's tail)."""
    Ls, Rs = [], []
    for wi, u, st in zip(w, updates, starts):
        a = u.adapters[name]
        Ls.append(float(wi) * a.scale * a.B)
        Rs.append(a.A)
        if name in st.base_delta:
            Ls.append(float(wi) * st.base_delta[name].L)
            Rs.append(st.base_delta[name].R)
    return Ls, Rs


def dense_reference(kind: str, Ls, Rs, restart: Adapter, rank: int, prev=None) -> tuple[float, float, tuple]:
    """Time the dense computation of one module; returns (seconds, peak MiB, outputs).

    sum           M = Σ_i p_i·s_i·B_i·A_i as one m×n GEMM of the stacked factors (the
                  fastest dense way; also FLoRA's residual, whose restart product is 0)
    residual      M, then the dense residual M − s·B'·A' (FedEx-LoRA, HEXA "mean")
    svd           M, then torch.linalg.svd(M) (FRA, FlexLoRA)
    svd_residual  as svd, plus the dense tail M − M_r (HEXA svd restarts)
    fedhl         W_{t+1} = W_t + M − Σ_i p_i·W_t^{r_i} from the held dense W_t and its
                  SVD (one GEMM), then the SVD of W_{t+1} that the next download needs
    """
    with PeakRSS() as mem:
        t0 = perf_counter()
        M = torch.cat(Ls, dim=1) @ torch.cat(Rs, dim=0)
        out: tuple = (M,)
        if kind == "residual":
            out = (torch.addmm(M, restart.B, restart.A, alpha=-restart.scale),)
        elif kind in ("svd", "svd_residual"):
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            out = (U, S, Vh)
            if kind == "svd_residual":
                out += (torch.addmm(M, U[:, :rank] * S[:rank], Vh[:rank], alpha=-1.0),)
        elif kind == "fedhl":
            W, U, S, Vh, kept = prev
            M += W
            M.addmm_(U * (S * kept), Vh, alpha=-1.0)
            out = torch.linalg.svd(M, full_matrices=False)
        elif kind != "sum":
            raise ValueError(f"unknown dense reference {kind!r}")
        seconds = perf_counter() - t0
    return seconds, mem.mib, out


def rel_error(result: Tensor, target: Tensor) -> float:
    return float((result - target).norm() / target.norm().clamp_min(1e-300))


def warm_up(cfg: dict) -> None:
    """The same row on two tiny modules, untimed: the first QR/SVD/float64 GEMM of a process
    pays one-off library initialisation that is no part of an aggregation."""
    small = {"warm.a": (48, 48), "warm.b": (48, 96)}
    tiny = {**cfg, "shapes": small, "dense_modules": list(small), "repeats": 1, "fold": False, "profile": False, "warm_libraries": False}
    tiny["ranks"] = [min(x, 8) for x in cfg["ranks"]]
    tiny["rank"] = min(cfg["rank"], 8)
    run_row(tiny)


def run_row(cfg: dict) -> dict:
    """Build, time and check one row; ``cfg`` is plain data (see aggregation.run_preset)."""
    torch.set_num_threads(cfg["threads"])
    if cfg.get("warm_libraries", True):
        warm_up(cfg)
    shapes = {k: tuple(v) for k, v in cfg["shapes"].items()}
    r, ranks, dense_names = cfg["rank"], cfg["ranks"], cfg["dense_modules"]
    agg = get_aggregator(cfg["method"], **cfg["options"])
    if cfg["check"] == "auto":
        cfg = {**cfg, "check": "exact" if agg.exact else "inexact"}
    gen = torch.Generator().manual_seed(cfg["seed"])
    state = agg.init_state(shapes, r, LoraSpec(alpha=2 * r), seed=cfg["seed"])
    if cfg["warmup"]:  # FedHL: one untimed round so that W_t ≠ 0 and its weights are non-trivial
        warm, _ = make_updates(agg, state, ranks, gen, ())
        state = agg.aggregate(state, warm)
        del warm
    updates, starts = make_updates(agg, state, ranks, gen, dense_names)

    # --- the aggregation, best of `repeats`; peak memory of the first run
    # CPU time (all threads) is kept too: unlike wall time it barely moves when other
    # processes share the cores, at least with one thread (a waiting thread may spin).
    times, cpu, new = [], [], None
    for rep in range(cfg["repeats"]):
        new = None
        gc.collect()
        with PeakRSS() as mem:
            t0, c0 = perf_counter(), process_time()
            new = agg.aggregate(state, updates)
            times.append(perf_counter() - t0)
            cpu.append(process_time() - c0)
        if rep == 0:
            agg_mib, mem_exact = mem.mib, mem.exact

    # --- download per client next round (the largest over the clients' ranks)
    down, dense_down = 0, 0
    for rank in sorted(set(ranks)):
        start = agg.client_start(new, rank)
        total = start.numel() + new.broadcast_numel()
        if total > down:
            adapters = sum(a.numel() for a in start.adapters.values())
            down, dense_down = total, adapters + sum(m * n for m, n in shapes.values())

    # --- dense reference on `dense_names`, and the float64 error on the same modules
    info = new.info
    w = info.get("hexa_weights") or info.get("fedhl_weights") or info["weights"]
    if cfg["check"] == "inexact":
        w = info["weights"]  # FedIT/HetLoRA: the exact FedAvg target Σ p_i·s_i·B_i·A_i
    globals_new = agg.global_delta(new)
    globals_old = agg.global_delta(state) if cfg["dense"] == "fedhl" else {}
    dense_s, dense_mib, errors = {}, 0.0, []
    for name in dense_names:
        Ls, Rs = client_terms(updates, starts, name, w)
        prev = None
        if cfg["dense"] == "fedhl":  # the dense server holds W_t and its SVD from the last round
            svd = state.extra["global"][name].truncate(max(ranks))  # only the top r_max part is ever cut off
            j = torch.arange(svd.rank)
            kept = sum(float(q) * (j < ra).to(svd.S.dtype) for q, ra in zip(w, ranks))
            prev = (globals_old[name].dense(), svd.U, svd.S, svd.Vh, kept)
        best = math.inf
        for _ in range(cfg["repeats"]):
            sec, mib, out = dense_reference(cfg["dense"], Ls, Rs, new.adapters[name], r, prev)
            best, dense_mib = min(best, sec), max(dense_mib, mib)
        dense_s[name] = best
        result = globals_new[name].dense(torch.float64)
        if name in new.base_delta:
            result += new.base_delta[name].dense(torch.float64)
        target = torch.cat(Ls, 1).double() @ torch.cat(Rs, 0).double()
        if cfg["check"] == "fedhl":  # W_t + Σ q_i·(s_i·B_i·A_i − W_t^{r_i}), W_t^{r_i} = the start it sent
            target += globals_old[name].dense(torch.float64)
            for q, st in zip(w, starts):
                target -= float(q) * st.adapters[name].delta().dense(torch.float64)
        elif cfg["check"] == "truncation":  # FRA: the rank-r truncation of the dense fp32 SVD
            U, S, Vh = out[:3]
            target = (U[:, :r].double() * S[:r].double()) @ Vh[:r].double()
        errors.append(rel_error(result, target))
        del out, Ls, Rs, prev

    row = {
        "label": cfg["label"],
        "method": cfg["method"],
        "options": cfg["options"],
        "ranks": ranks,
        "exact": agg.exact,
        "check": cfg["check"],
        "dense_kind": cfg["dense"],
        "agg_s": min(times),
        "agg_runs_s": times,
        "agg_cpu_s": cpu[times.index(min(times))],
        "agg_peak_mib": agg_mib,
        "peak_exact": mem_exact,
        "dense_module_s": dense_s,
        "dense_peak_mib": dense_mib,
        "max_rel_error": max(errors, default=float("nan")),
        "download": down,
        "dense_download": dense_down,
        "weights": [round(float(x), 6) for x in w],
    }
    if "inexactness" in info:
        row["reported_inexactness"] = info["inexactness"]
    if cfg.get("fold"):
        row["fold_device"] = cfg.get("fold_device", "cpu")
        row["fold_s"] = time_fold(new, shapes, cfg["repeats"], torch.device(row["fold_device"]))
        row.update(time_factored_fold(new, shapes, gen))
    if cfg.get("profile"):
        del new
        row["profile"] = {"per_module_s": time_per_module(cfg, shapes), "top_functions": top_functions(agg, state, updates)}
    return row


def time_per_module(cfg: dict, shapes: dict) -> dict[str, float]:
    """For each distinct shape, a one-module round of the same row (same ranks and warm-up), best of 3."""
    out = {}
    for shape in dict.fromkeys(shapes.values()):
        agg = get_aggregator(cfg["method"], **cfg["options"])
        gen = torch.Generator().manual_seed(cfg["seed"])
        state = agg.init_state({"probe": shape}, cfg["rank"], LoraSpec(alpha=2 * cfg["rank"]), seed=cfg["seed"])
        if cfg["warmup"]:
            state = agg.aggregate(state, make_updates(agg, state, cfg["ranks"], gen, ())[0])
        updates, _ = make_updates(agg, state, cfg["ranks"], gen, ())
        times = []
        for _ in range(4):  # the first run is a warm-up
            t0 = perf_counter()
            agg.aggregate(state, updates)
            times.append(perf_counter() - t0)
        out[f"{shape[0]}×{shape[1]}"] = min(times[1:])
    return out


def top_functions(agg, state, updates, count: int = 6) -> list[tuple[str, float]]:
    """One more whole-model aggregate under cProfile: the functions with the most own time."""
    prof = cProfile.Profile()
    prof.runcall(agg.aggregate, state, updates)
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, ncalls, tottime, cumtime, callers)}
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:count]
    return [(_label(*key), round(v[2], 3)) for key, v in top]


def _label(file: str, line: int, name: str) -> str:
    """'factored.py:144(svd)', 'torch.geqrf', 'Tensor.double'."""
    if file != "~":
        return f"{file.rsplit('/', 1)[-1]}:{line}({name})"
    name = name.strip("<>")
    if name.startswith("built-in method "):
        return name[len("built-in method ") :].replace("torch._C._linalg.linalg_", "torch.linalg.")
    if name.startswith("method '"):
        return "Tensor." + name.split("'")[1]
    return name


def time_factored_fold(state, shapes, gen: torch.Generator) -> dict:
    """The fold with ``model.base_delta: factored`` (models/base_delta.py), W0 never written:
    round 1's base delta (untimed) starts each module's side at its rank k; round 2 appends this
    round's delta (2k ≤ 2k: no compression, timed); round 3 appends another independent one of
    the same rank, 3k > 2k, so the side is compressed to its numerical rank (timed)."""
    from torch import nn

    from ..models.base_delta import BaseDeltas

    layers = {shape: nn.Linear(shape[1], shape[0], bias=False) for shape in set(shapes.values())}
    deltas = BaseDeltas({name: layers[shapes[name]] for name in state.base_delta}, dict.fromkeys(state.base_delta, False), "factored")

    def independent() -> dict:
        return {
            n: type(d)(torch.randn(d.L.shape, generator=gen) * float(d.L.std()), torch.randn(d.R.shape, generator=gen) * float(d.R.std()))
            for n, d in state.base_delta.items()
        }

    deltas.fold(independent())
    t0 = perf_counter()
    deltas.fold(state.base_delta)
    append = perf_counter() - t0
    third = independent()
    t0 = perf_counter()
    deltas.fold(third)
    compress = perf_counter() - t0
    k = max(side.compressed_rank for side in deltas.sides.values())
    return {"fold_factored_s": append, "fold_compress_s": compress, "fold_compress_k": k}


def time_fold(state, shapes, repeats: int, device: torch.device | None = None) -> float:
    """Fold every module's base_delta into a dense fp32 weight on ``device``: one weight per
    distinct shape, reused for every module of that shape (same flops as separate weights).
    On an accelerator the time includes moving the factors there (they leave the aggregator
    on the CPU) and waits for the device to finish."""
    device = device or torch.device("cpu")
    weights = {shape: torch.randn(*shape, device=device) * 0.02 for shape in set(shapes.values())}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = math.inf
    for _ in range(repeats + (device.type != "cpu")):  # an accelerator's first run pays for its kernels' start-up
        sync()
        t0 = perf_counter()
        for name, delta in state.base_delta.items():
            fold_delta(weights[shapes[name]], delta)
        sync()
        best = min(best, perf_counter() - t0)
    return best
