"""``python -m panther bench <suite>``: benchmark suites, each a module with ``main(argv)``."""

from __future__ import annotations

import argparse
import datetime
import importlib
import platform
import sys

SUITES = ("linear", "attention")


def run_env(suite: str, argv: list[str] | None) -> dict[str, str]:
    """Where and how a benchmark ran (date, device, versions, command), recorded in its JSON."""
    import torch
    import triton

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": f"python -m panther bench {suite} " + " ".join(argv if argv is not None else sys.argv[1:]),
    }


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
