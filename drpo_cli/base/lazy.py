"""`torch = lazy("torch")`: a module imported on its first attribute use, not at import time.

The loss modules and the registry they fill are read by config.py and the command line, which must
answer `drpo --help`, `drpo validate` and a bad option in milliseconds, without importing torch.
Type hints stay free: `from __future__ import annotations` and `if TYPE_CHECKING: from torch import Tensor`.
"""

from __future__ import annotations

import importlib
import sys
import types


class LazyModule(types.ModuleType):
    """Stands for module `name` until an attribute is read; then imports it and copies its names."""

    def __getattr__(self, attr: str):
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)  # later reads are plain attribute reads
        return getattr(module, attr)


def lazy(name: str) -> types.ModuleType:
    """Module `name` itself when it is imported already, else a LazyModule standing for it."""
    return sys.modules.get(name) or LazyModule(name)
