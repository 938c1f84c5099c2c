"""The benchmark scripts' modules (benchmarks/ is a folder of scripts, not a package) for tests that reuse them."""

import importlib
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def import_script(name: str):
    """benchmarks/<name>.py as a module; its own imports (``common``) resolve as when it runs as a script."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
