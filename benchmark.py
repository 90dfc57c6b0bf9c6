"""Benchmarks for this project: every figure in BENCHMARKS.md comes from a subcommand here.

    python benchmark.py SUBCOMMAND [options]      (python benchmark.py --help lists them)

Variants are always measured side by side in one run and a ratio is printed, because the machines
this runs on are shared and noisy.
"""
import argparse
import json
import sys

SUBCOMMANDS = {}  # name -> (add_arguments(parser), run(args) -> dict of figures)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None)
        add_arguments(p)
        p.add_argument("--json", default=None, help="also write the figures to this JSON file")
        p.set_defaults(_run=run)
    args = parser.parse_args(argv)
    figures = args._run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
