"""`python -m bench <name> [--preset P] [--device cpu|cuda] [--json FILE] ...`

Each benchmark is a module `bench/<name>.py` with `add_args(parser)` and `run(args) -> dict`.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in {"common", "__main__"})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in names:
        print(__doc__)
        print("benchmarks:", ", ".join(names))
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    name = argv.pop(0)
    module = importlib.import_module(f"bench.{name}")
    parser = argparse.ArgumentParser(prog=f"python -m bench {name}", description=module.__doc__)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", default=None, help="write the result JSON here")
    module.add_args(parser)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda asked for, but torch sees no CUDA device")
    module.run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
