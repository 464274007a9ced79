"""The ``fedlora`` command line. Each sub-command lives in its own module; this
file only parses arguments and turns expected failures into one-line errors."""

from __future__ import annotations

import argparse
import sys

from .core.errors import AggregationError


def _bench_aggregation(args: argparse.Namespace) -> int:
    from .bench.aggregation import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning with exact aggregation.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    agg = bench_sub.add_parser("aggregation", help="time every aggregation method against the dense reference")
    from .bench.aggregation import add_arguments

    add_arguments(agg)
    agg.set_defaults(func=_bench_aggregation)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (AggregationError, ValueError, FileNotFoundError) as e:
        print(f"fedlora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
