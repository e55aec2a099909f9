"""``python -m panther bench <suite>``: benchmark suites, each a module with ``main(argv)``."""

from __future__ import annotations

import argparse
import importlib

SUITES = ("linear", "attention")


def main(argv: list[str] | None = None) -> int:
    # No automatic --help here: `bench linear --help` must reach the suite's own parser.
    parser = argparse.ArgumentParser(prog="python -m panther bench", add_help=False)
    parser.add_argument("suite", choices=SUITES, help="which benchmark suite to run")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(f"panther.bench.{args.suite}")
    return module.main(rest)
