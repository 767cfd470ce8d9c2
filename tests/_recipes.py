"""Import a recipe script as a module without putting recipes/ on sys.path.

recipes/evaluate.py would otherwise shadow the `evaluate` package for every later import in the test session.
"""

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def load_recipe(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"lmkit_recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
