"""Benchmarks for this project: every figure in BENCHMARKS.md comes from a subcommand here.

    python benchmark.py SUBCOMMAND [options]      (python benchmark.py --help lists them)

Variants are always measured side by side in one run and a ratio is printed, because the machines
this runs on are shared and noisy.
"""
import argparse
import importlib
import json
import sys

import files

# Subcommand -> the bench_*.py module that holds it (its COMMANDS: name -> (add_arguments(parser), run(args) -> dict
# of figures)). A subcommand's module is imported only when that subcommand runs (all of them for --help), and each
# imports only what its subcommand needs; a worker's fresh process (bench_process.in_fresh_process) imports only the
# worker's module. So `eval`'s fresh process holds what whole-scene prediction loads and no more, which is why this
# file no longer needs importlib's LazyLoader (it once loaded losses, the training script, scipy.signal and torch's
# FLOP counter lazily, for that figure's sake).
SUBCOMMANDS = {"loss": "bench_loss", "data": "bench_data", "clouds": "bench_data", "eval": "bench_eval",
               "train": "bench_train", "memory": "bench_memory", "loop": "bench_loop", "learn": "bench_learn",
               "sparsify": "bench_sparsify"}


def subcommand(name):
    """(add_arguments(parser), run(args) -> dict of figures) of a subcommand; imports its module."""
    return importlib.import_module(SUBCOMMANDS[name]).COMMANDS[name]


def build_parser(names=tuple(SUBCOMMANDS)):
    """The command line with the subcommands `names` (default: all, which imports every bench_*.py module)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in names:
        add_arguments, run = subcommand(name)
        p = sub.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None)
        add_arguments(p)
        p.add_argument("--json", default=None, help="also write the figures to this JSON file")
        p.set_defaults(_run=run)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # The subcommand is the first word (the top level has no flag but --help): only its module is imported. --help
    # before it, no subcommand, or an unknown one: all of them, so that the usage lists them.
    names = argv[:1] if argv[:1] and argv[0] in SUBCOMMANDS else tuple(SUBCOMMANDS)
    args = build_parser(names).parse_args(argv)
    figures = args._run(args)
    if args.json:
        files.write_text_atomic(args.json, json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
