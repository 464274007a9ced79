"""The ``fedlora`` command line. Each sub-command's work lives in its own module;
this file parses arguments and turns expected failures into one-line errors
with a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys


def _split_config(args: argparse.Namespace) -> None:
    """``fedlora run key=value ...`` without a config file: the first override is not a file."""
    from pathlib import Path

    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]
        args.config = None


def _run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine.run import run_experiment, run_name

    cfg = load_config(args.config, args.overrides)
    summary = run_experiment(cfg, overwrite=args.overwrite)
    metric = summary["primary_metric"]
    print(
        f"{run_name(cfg)}: best {metric} {summary['best'].get(metric, float('nan')):.4f} (round {summary['best_round']}), "
        f"final {summary['final'].get(metric, float('nan')):.4f}; folder {cfg.output_dir}/{run_name(cfg)}"
    )
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from .config import load_config
    from .engine.plan import plan_text, run_plan

    plan = run_plan(load_config(args.config, args.overrides))
    print(json.dumps(plan, indent=1) if args.json else plan_text(plan))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .engine.merge import merge_run

    print(f"merged model written to {merge_run(args.run_dir, args.out)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .engine.generate import generate_from_run

    for prompt, answer in zip(args.prompts, generate_from_run(args.run_dir, args.prompts, args.max_new_tokens)):
        print(f"### {prompt}\n{answer}\n")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _split_specs(text: str) -> list[str]:
    """Comma-separated specs; commas inside ``[...]`` belong to a method's options."""
    import re

    return [s.strip() for s in re.split(r",(?![^\[]*\])", text) if s.strip()]


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import ConfigError
    from .engine.grid import Cell, collect
    from .report.compare import write_report

    try:
        seeds = [int(x) for x in _split_specs(args.seeds)]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    cells = [Cell(m, p, s) for p in _split_specs(args.partitions) for m in _split_specs(args.methods) for s in seeds]
    if not cells:
        raise ConfigError("--methods, --partitions and --seeds must each name at least one entry")
    shard = None
    if args.shard is not None:
        from .engine.grid import parse_shard

        shard = parse_shard(args.shard)
        if (args.collect_only or args.partial) and not args.status:
            raise ConfigError(
                "--shard runs one machine's share and writes no tables; collect every machine's run folders into one output_dir, then run --collect-only or --partial without --shard"
            )
    if args.status:
        from .engine.grid import grid_status, status_table

        print(status_table(grid_status(cells, args.config, args.overrides, shard)), end="")
        return 0
    results = collect(
        cells,
        args.config,
        args.overrides,
        run=not (args.collect_only or args.partial),
        overwrite=args.overwrite,
        skip_missing=args.partial,
        jobs=args.jobs,
        shard=shard,
    )
    if shard is not None:
        # One share's cells make no table: a table of some methods' seeds would read as the grid's.
        print(
            f"shard {shard[0]}/{shard[1]}: {len(results)} of the grid's {len(cells)} cells finished here. When every shard is done, "
            "copy each machine's run folders into one output_dir and run the same command without --shard, with --collect-only, for the tables."
        )
        return 0
    path = write_report(results, Path(args.out), args.title, baseline=args.baseline)
    print(path.read_text())
    print(f"written: {path}, {path.with_suffix('.png')}, {path.with_suffix('.json')}")
    return 0


def _bench(module: str):
    """The ``main`` of ``fedlora.bench.<module>``, imported only when its subcommand runs (the
    benchmarks pull in what a plain ``fedlora run`` does not need)."""

    def run_bench(args: argparse.Namespace) -> int:
        return importlib.import_module(f"fedlora.bench.{module}").main(args)

    return run_bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning with exact aggregation.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) one federated or centralized fine-tuning")
    run.add_argument("config", nargs="?", help="YAML or TOML config file (defaults apply to missing keys)")
    run.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. fed.method=fedex train.lr=1e-3")
    run.add_argument("--overwrite", action="store_true", help="delete an existing run folder of the same name first")
    run.set_defaults(func=_run)

    pln = sub.add_parser(
        "plan", help="what a run would do, without training: clients, ranks, local steps, and under DP the noise and the ε the run will report"
    )
    pln.add_argument("config", nargs="?", help="YAML or TOML config file, as for `fedlora run`")
    pln.add_argument("overrides", nargs="*", help="section.key=value overrides, as for `fedlora run`")
    pln.add_argument("--json", action="store_true", help="print the plan as JSON")
    pln.set_defaults(func=_plan)

    gen = sub.add_parser("generate", help="answer prompts with a finished causal-LM run's global model (its exported adapter)")
    gen.add_argument("run_dir", help="the run folder (runs/<name>)")
    gen.add_argument("prompts", nargs="+", help="one or more prompts, each answered on its own")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=128)
    gen.set_defaults(func=_generate)

    mrg = sub.add_parser("merge", help="write a finished run's global model as one standalone Hugging Face folder (adapter merged, head, tokenizer)")
    mrg.add_argument("run_dir", help="the run folder (runs/<name>)")
    mrg.add_argument("out", help="the folder to write (must not exist)")
    mrg.set_defaults(func=_merge)

    cmp_ = sub.add_parser("compare", help="run or collect a grid of methods × partitions × seeds; write a table and a plot")
    cmp_.add_argument("config", nargs="?", help="base config file")
    cmp_.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every cell")
    cmp_.add_argument("--methods", default="hexa,fedex,fedit", help="comma-separated method specs, e.g. hexa[drift_beta=0],centralized")
    cmp_.add_argument("--partitions", default="iid", help="comma-separated: iid, dirichlet:<alpha>, quantity:<alpha>, pathological:<k>")
    cmp_.add_argument("--seeds", default="0", help="comma-separated seeds")
    cmp_.add_argument("--out", default="results", help="folder for results.md / .png / .json")
    cmp_.add_argument("--title", default="fedlora comparison")
    cmp_.add_argument("--baseline", help="method the others are compared with, paired by seed (default: fedit if in the grid, else the first)")
    cmp_.add_argument("--collect-only", action="store_true", help="do not run missing cells; fail instead")
    cmp_.add_argument("--partial", action="store_true", help="like --collect-only, but leave unfinished cells out of the table")
    cmp_.add_argument("--overwrite", action="store_true", help="re-run cells that already finished")
    cmp_.add_argument("--status", action="store_true", help="list each run's state (finished, rounds done, not started) and the compute left; run nothing")
    cmp_.add_argument("--jobs", type=_positive_int, default=1, help="run missing cells in this many processes (set threads=cores/jobs)")
    cmp_.add_argument(
        "--shard",
        metavar="K/N",
        help="split the grid over N machines: run (or list, with --status) only share K's runs, chosen by a hash of each run's name; write no tables",
    )
    cmp_.set_defaults(func=_compare)

    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    agg = bench_sub.add_parser("aggregation", help="time every aggregation method against the dense reference")
    from .bench.aggregation import add_arguments

    add_arguments(agg)
    agg.set_defaults(func=_bench("aggregation"))
    bd = bench_sub.add_parser("base-delta", help="base deltas beside W0 (factored) against folded into W0: time per round, memory, forward cost")
    from .bench.base_delta import add_arguments as add_base_delta_arguments

    add_base_delta_arguments(bd)
    bd.set_defaults(func=_bench("base_delta"))
    cl = bench_sub.add_parser("clients", help="peak memory and time per round against the number of clients (same data, same work per round)")
    from .bench.clients import add_arguments as add_clients_arguments

    add_clients_arguments(cl)
    cl.set_defaults(func=_bench("clients"))
    ovh = bench_sub.add_parser("overhead", help="federated wall time / centralized wall time, evaluation excluded")
    ovh.add_argument("config", nargs="?")
    ovh.add_argument("overrides", nargs="*")
    ovh.set_defaults(func=_bench("overhead"))
    prec = bench_sub.add_parser("precision", help="fp32 against bf16 autocast over whole runs: throughput and final metric, paired by seed")
    prec.add_argument("config", nargs="?")
    prec.add_argument("overrides", nargs="*")
    prec.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (each runs fp32 and bf16)")
    prec.set_defaults(func=_bench("precision"))
    loop = bench_sub.add_parser("loop", help="fedlora's training loop against a plain peft + torch loop on the same batches")
    loop.add_argument("config", nargs="?")
    loop.add_argument("overrides", nargs="*")
    loop.add_argument("--repeats", type=_positive_int, default=3)
    loop.add_argument("--steps", type=_positive_int, default=20, help="optimiser steps per timed loop")
    loop.set_defaults(func=_bench("loop"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .core.errors import AggregationError, RoundFailed
    from .data.errors import DataError
    from .models.hub import ModelError

    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "overrides"):
        _split_config(args)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, ModelError, AggregationError, FileNotFoundError, ValueError) as e:
        print(f"fedlora: error: {e}", file=sys.stderr)
        return 2
    except RoundFailed as e:  # every client of a round failed (diverged, refused): the checkpoint keeps the rounds before
        print(f"fedlora: error: {e}; the run stopped there (its folder keeps the rounds before)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedlora: interrupted; `fedlora run` with the same config resumes from the last completed round", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
