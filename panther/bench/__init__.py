"""``python -m panther bench <suite>``: benchmark suites, each a module with ``main(argv)``."""

from __future__ import annotations

import argparse
import importlib

SUITES = ("linear", "attention")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m panther bench")
    parser.add_argument("suite", choices=SUITES)
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(f"panther.bench.{args.suite}")
    return module.main(rest)
