"""``python -m panther <command>``: ``demo`` (the tour) and ``bench`` (benchmarks)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m panther", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="tour of the sketched layers, the compiler backend, and accuracy on a trained model", add_help=False)
    sub.add_parser("bench", help="benchmarks: `python -m panther bench {linear,attention} --help`", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from panther.demo import main as demo_main

        return demo_main(rest)
    from panther.bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
