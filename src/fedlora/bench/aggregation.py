"""``fedlora bench aggregation``: every registered aggregation method, timed on a
whole model's worth of synthetic client updates against the dense computation
it avoids, with its error, peak memory and per-client download.

Each row (one method, or one variant such as HEXA with mixed ranks) runs in a
fresh process (:func:`fedlora.bench._round.run_row`) so that its peak memory
is its own. At LLaMA-7B shapes a dense SVD of one 4096×4096 matrix takes
20–60 s on two cores, so the dense side is timed on ``--dense-modules``
modules (one per shape class by default) and scaled to the model's module
count; the table says so. ``--profile`` adds per-module timings and the
functions with the most own time, for rows that miss their target.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

from ..core import available_methods

PRESETS = {
    "roberta-base": {
        "layers": 12,
        "modules": {"query": (768, 768), "value": (768, 768)},
        "clients": 3,
        "rank": 4,
        "repeats": 3,
        "dense_modules": None,
    },  # None: all modules
    "llama-7b": {
        "layers": 32,
        "modules": {**{t: (4096, 4096) for t in ("q", "k", "v", "o")}, "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)},
        "clients": 10,
        "rank": 16,
        "repeats": 1,
        "dense_modules": 2,
    },
}
SVD_KINDS = ("svd", "svd_residual", "fedhl")
DENSE_LABELS = {"sum": "Σ", "residual": "Σ + residual", "svd": "Σ + SVD", "svd_residual": "Σ + SVD + residual", "fedhl": "W_t update + SVD"}


@dataclass(frozen=True)
class Row:
    """One table row: a method (with options), its client ranks and how it is checked."""

    label: str
    method: str
    dense: str  # the dense reference, see _round.dense_reference
    check: str  # exact | inexact | fedhl | truncation | auto (exact or inexact from the method's flag)
    options: dict = field(default_factory=dict)
    mixed: bool = False  # client ranks cycle r, r/2, r/4
    warmup: bool = False  # time the second round (FedHL needs W_t ≠ 0)
    fold: bool = False  # also time folding base_delta into dense weights


ROWS = [
    Row("fedex", "fedex", "residual", "exact", fold=True),
    Row("fedhl (round 2)", "fedhl", "fedhl", "fedhl", mixed=True, warmup=True),
    Row("fedit", "fedit", "sum", "inexact"),
    Row("ffa", "ffa", "sum", "exact"),
    Row("fedsvd", "fedsvd", "sum", "exact"),
    Row("rolora", "rolora", "sum", "exact"),
    Row("fedsa (A only)", "fedsa", "sum", "inexact"),
    Row("fedsb (round 1: frames)", "fedsb", "svd_residual", "exact"),
    Row("fedsb (round 2: R only)", "fedsb", "sum", "exact", warmup=True),
    Row("flexlora", "flexlora", "svd", "exact"),
    Row("flora", "flora", "sum", "exact"),
    Row("fra", "fra", "svd", "truncation"),
    Row("hetlora", "hetlora", "sum", "inexact"),
    Row("hexa", "hexa", "residual", "exact"),
    Row("hexa (mixed ranks)", "hexa", "residual", "exact", mixed=True),
    Row("hexa (svd_sqrt)", "hexa", "svd_residual", "exact", options={"restart": "svd_sqrt"}),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=[*PRESETS, "both"], default="both", help="model shapes (default: both)")
    parser.add_argument("--clients", type=int, help="clients per round (default: 3 roberta, 10 llama)")
    parser.add_argument("--rank", type=int, help="global LoRA rank r (default: 4 roberta, 16 llama)")
    parser.add_argument("--layers", type=int, help="transformer layers (default: 12 roberta, 32 llama)")
    parser.add_argument("--methods", help="comma-separated methods (default: all registered)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, help="best of N timings (default: 3 roberta, 1 llama)")
    parser.add_argument("--dense-modules", type=int, help="modules timed densely, spread over the shape classes (default: all for roberta, 2 for llama)")
    parser.add_argument("--threads", type=int, help="torch CPU threads, in every row's process (default: torch's, one per core)")
    parser.add_argument("--profile", action="store_true", help="also time one module of each shape alone and list the functions with the most own time")
    parser.add_argument(
        "--fold-device", default="cpu", help="where the fold row's dense W0 lives (cpu, cuda): the fold runs where the model trains (default: cpu)"
    )
    parser.add_argument("--out", help="also write the results as JSON to this file")


def module_shapes(preset: dict, layers: int) -> dict[str, tuple[int, int]]:
    return {f"layer{i}.{t}": shape for i in range(layers) for t, shape in preset["modules"].items()}


def shape_class(shape: tuple[int, int]) -> tuple[int, int]:
    """Transposed shapes (4096×11008 and 11008×4096) cost the same dense GEMM and SVD."""
    return tuple(sorted(shape))


def pick_dense_modules(shapes: dict, count: int | None) -> list[str]:
    """``count`` modules, round-robin over the shape classes (all modules when None)."""
    if count is None or count >= len(shapes):
        return list(shapes)
    by_class: dict = {}
    for name, shape in shapes.items():
        by_class.setdefault(shape_class(shape), []).append(name)
    if count < len(by_class):
        raise ValueError(f"--dense-modules must be ≥ {len(by_class)}, the number of shape classes {sorted(by_class)}")
    classes = list(by_class.values())
    return [classes[i % len(classes)][i // len(classes)] for i in range(count)]


def client_ranks(rank: int, clients: int, mixed: bool) -> list[int]:
    cycle = [rank, max(1, rank // 2), max(1, rank // 4)] if mixed else [rank]
    return [cycle[i % len(cycle)] for i in range(clients)]


def extrapolate(module_s: dict[str, float], shapes: dict) -> float:
    """Σ over shape classes of (mean timed seconds per module of that class) × (modules of that class)."""
    per_class: dict = {}
    for name, sec in module_s.items():
        per_class.setdefault(shape_class(shapes[name]), []).append(sec)
    counts: dict = {}
    for shape in shapes.values():
        counts[shape_class(shape)] = counts.get(shape_class(shape), 0) + 1
    return sum(sum(ts) / len(ts) * counts[c] for c, ts in per_class.items())


def run_preset(name: str, args: argparse.Namespace, methods: list[str], threads: int) -> dict:
    preset = PRESETS[name]
    layers, clients, rank = args.layers or preset["layers"], args.clients or preset["clients"], args.rank or preset["rank"]
    repeats = args.repeats or preset["repeats"]
    shapes = module_shapes(preset, layers)
    dense_count = args.dense_modules if args.dense_modules is not None else preset["dense_modules"]
    dense_names = pick_dense_modules(shapes, dense_count)
    rows = [r for r in ROWS if r.method in methods]
    rows += [Row(m, m, "sum", "auto") for m in methods if m not in {r.method for r in ROWS}]  # newly registered
    config = {
        "preset": name,
        "layers": layers,
        "modules": len(shapes),
        "clients": clients,
        "rank": rank,
        "repeats": repeats,
        "dense_modules": dense_names,
        "seed": args.seed,
        "shapes": dict(preset["modules"]),
    }
    results = []
    for row in rows:
        cfg = {
            "label": row.label,
            "method": row.method,
            "options": row.options,
            "dense": row.dense,
            "check": row.check,
            "warmup": row.warmup,
            "fold": row.fold,
            "ranks": client_ranks(rank, clients, row.mixed),
            "rank": rank,
            "shapes": shapes,
            "dense_modules": dense_names,
            "repeats": repeats,
            "seed": args.seed,
            "threads": threads,
            "profile": args.profile,
            "fold_device": args.fold_device,
        }
        print(f"[{name}] {row.label} …", file=sys.stderr, flush=True)
        # A fresh process per row: its peak RSS is this row's alone.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            from ._round import run_row

            res = pool.submit(run_row, cfg).result()
        res["dense_s"] = extrapolate(res["dense_module_s"], shapes)
        res["dense_extrapolated"] = len(dense_names) < len(shapes)
        res["speedup"] = res["dense_s"] / res["agg_s"]
        print(
            f"[{name}] {row.label}: aggregate {res['agg_s']:.3f} s, dense {res['dense_s']:.2f} s, error {res['max_rel_error']:.2e}", file=sys.stderr, flush=True
        )
        results.append(res)
    out = {"config": config, "rows": results}
    out["targets"] = check_targets(out)
    return out


def check_targets(result: dict) -> list[dict]:
    cfg, rows, targets = result["config"], result["rows"], []
    if cfg["preset"] == "llama-7b":
        for r in rows:
            if r["dense_kind"] in SVD_KINDS:
                targets.append(
                    {
                        "target": f"{r['label']}: ≥500× faster than the dense SVD reference at 4096 width",
                        "value": f"{r['speedup']:.0f}×",
                        "pass": r["speedup"] >= 500,
                    }
                )
        for r in rows:
            targets.append(
                {
                    "target": f"{r['label']}: whole-model aggregation ({cfg['modules']} modules) ≤ 5 s",
                    "value": f"{r['agg_s']:.2f} s",
                    "pass": r["agg_s"] <= 5.0,
                }
            )
        for r in rows:
            for key, how in (
                ("fold_s", f"into dense fp32 W0 on {r.get('fold_device', 'cpu')}"),
                ("fold_factored_s", "kept factored beside W0, append"),
                ("fold_compress_s", "kept factored, a compressing round"),
            ):
                if key in r:
                    targets.append({"target": f"{r['label']}: fold of a round's base delta ({how}) ≤ 5 s", "value": f"{r[key]:.2f} s", "pass": r[key] <= 5.0})
    if cfg["preset"] == "roberta-base":
        for r in rows:
            if r["method"] in ("fedex", "hexa"):
                ratio = r["dense_download"] / r["download"]
                targets.append({"target": f"{r['label']}: download ≥10× smaller than with a dense residual", "value": f"{ratio:.1f}×", "pass": ratio >= 10})
    return targets


def _ranks(ranks: list[int]) -> str:
    distinct = list(dict.fromkeys(ranks))
    return f"{ranks[0]} ×{len(ranks)}" if len(distinct) == 1 else "/".join(map(str, distinct)) + f" (cycling, K={len(ranks)})"


def _error(r: dict) -> str:
    e = f"{r['max_rel_error']:.1e}"
    return {"exact": e, "inexact": f"{e} (inexactness vs exact Σ)", "fedhl": f"{e} (vs FedHL dense formula)", "truncation": f"{e} (vs dense SVD truncation)"}[
        r["check"]
    ]


def format_table(result: dict) -> str:
    cfg = result["config"]
    ext = any(r["dense_extrapolated"] for r in result["rows"])
    lines = [
        f"### {cfg['preset']}: {cfg['layers']} layers × {{{', '.join(cfg['shapes'])}}} = {cfg['modules']} modules, "
        f"K={cfg['clients']} clients, r={cfg['rank']}, best of {cfg['repeats']}",
        "",
        "| method | client ranks | dense reference | aggregate (s) | agg. CPU (s) | dense (s) | speed-up | max rel. error "
        "| agg. peak RSS (MiB) | dense peak/module (MiB) | download/client | with dense residual | smaller by |",
        "|---|---|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|",
    ]
    for r in result["rows"]:
        peak = ("" if r["peak_exact"] else "≥") + f"{r['agg_peak_mib']:.0f}"
        dense = f"{r['dense_s']:.2f}" + (" *" if r["dense_extrapolated"] else "")
        lines.append(
            f"| {r['label']} | {_ranks(r['ranks'])} | {DENSE_LABELS[r['dense_kind']]} | {r['agg_s']:.3f} | {r['agg_cpu_s']:.3f} | {dense} "
            f"| {r['speedup']:.0f}× | {_error(r)} | {peak} | {r['dense_peak_mib']:.0f} "
            f"| {r['download'] / 1e6:.3f} M | {r['dense_download'] / 1e6:.3f} M | {r['dense_download'] / r['download']:.1f}× |"
        )
    lines.append("")
    if ext:
        lines.append(
            f"\\* extrapolated: the dense reference was timed on {len(cfg['dense_modules'])} modules "
            f"({', '.join(cfg['dense_modules'])}) and scaled per shape class to all {cfg['modules']} modules."
        )
    else:
        lines.append(f"Dense reference timed on all {cfg['modules']} modules (not extrapolated).")
    lines.append(
        "aggregate: wall time, best of the repeats (perf_counter); agg. CPU: process CPU time of that run, all threads. "
        "Peak RSS: resident-memory high-water mark during aggregate() minus RSS before it, in a fresh process per row."
    )
    lines.append(
        "download/client: numbers one client downloads for the next round (its ClientStart adapters and client-only "
        "base delta, plus the shared state.base_delta), largest over the clients; with dense residual: the same adapters "
        "plus one dense m×n delta per module."
    )
    lines.append(
        f"Errors: relative Frobenius error in float64 on {', '.join(cfg['dense_modules'][:4])}"
        f"{' …' if len(cfg['dense_modules']) > 4 else ''}, max over those modules."
    )
    for r in result["rows"]:
        if "fold_s" in r:
            lines.append(
                f"Folding {r['label']}'s base_delta into dense fp32 base weights on {r.get('fold_device', 'cpu')}, all {cfg['modules']} modules "
                f"(one weight per shape, reused): {r['fold_s']:.3f} s. Kept factored beside W0 (`model.base_delta: factored`): "
                f"appending it {r['fold_factored_s']:.3f} s; the round after, whose append triggers the compression "
                f"to the numerical rank (k = {r['fold_compress_k']}), {r['fold_compress_s']:.3f} s."
            )
    lines.append("")
    lines += [f"- {'PASS' if t['pass'] else 'FAIL'}: {t['target']} ({t['value']})" for t in result["targets"]]
    profiled = [r for r in result["rows"] if "profile" in r]
    if profiled:
        lines += [
            "",
            "Where the time goes (--profile): one module of each shape aggregated alone (best of 3), "
            "scaled by the module counts; and the functions with the most own time in one whole-model run (cProfile).",
            "",
            "| method | per module (ms) | × module counts (s) | whole model (s) | most own time (s) |",
            "|---|---|--:|--:|---|",
        ]
        counts: dict = {}
        for m, n in cfg["shapes"].values():
            counts[f"{m}×{n}"] = counts.get(f"{m}×{n}", 0) + cfg["layers"]
        for r in profiled:
            per = r["profile"]["per_module_s"]
            tops = ", ".join(f"{name} {sec:.2f}" for name, sec in r["profile"]["top_functions"])
            lines.append(
                f"| {r['label']} | {', '.join(f'{k}: {v * 1e3:.0f}' for k, v in per.items())} "
                f"| {sum(v * counts[k] for k, v in per.items()):.2f} | {r['agg_s']:.2f} | {tops} |"
            )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    known = available_methods()
    methods = known if not args.methods else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    presets = list(PRESETS) if args.preset == "both" else [args.preset]
    try:
        fold_device = torch.device(args.fold_device)
    except RuntimeError:
        raise ValueError(f"--fold-device {args.fold_device!r} is not a torch device (cpu, cuda, cuda:1, …)") from None
    if fold_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--fold-device {args.fold_device}: this machine has no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    # The row processes inherit this. With libgomp's default spin-waiting, a 2-thread MKL call
    # can be 60× slower while other processes share the cores (a 768×768 SVD: 27 s instead of
    # 0.4 s); passive waiting costs little on an idle machine. A value already set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    threads = torch.get_num_threads()
    argv = ["fedlora", *sys.argv[1:]] if os.path.basename(sys.argv[0]) == "fedlora" else sys.argv
    header = {
        "torch": torch.__version__,
        "threads": threads,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "command": shlex.join(argv),
        "load_before": os.getloadavg()[0],
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
    }
    print(
        f"## Aggregation benchmark\n\ntorch {header['torch']}, {threads} thread{'s' * (threads != 1)}, {header['cpus']} CPUs, "
        f"Python {header['python']} ({header['machine']}), OMP_WAIT_POLICY={header['omp_wait_policy']}, "
        f"1-min load average at start {header['load_before']:.2f}  \n"
        f"command: `{header['command']}`\n",
        flush=True,
    )
    results = {}
    for name in presets:
        results[name] = run_preset(name, args, methods, threads)
        print(format_table(results[name]) + "\n", flush=True)
    header["load_after"] = os.getloadavg()[0]
    print(
        f"1-min load average at the end: {header['load_after']:.2f} (other processes share the CPUs when it exceeds "
        f"{header['cpus']}; timings are then pessimistic)",
        flush=True,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "presets": results}, f, indent=1)
    return 0
