"""The functional equivalent of ``fastrms.torch.RMSprop`` that
``ZeroRedundancyOptimizer(..., overlap_with_ddp=True)`` needs, and its registration in torch's
table of functional optimizers (``torch.distributed.optim.utils.functional_optim_map``).

Importing ``torch.distributed.optim`` takes about 2 s, so ``import fastrms.torch`` does not do
it: it registers at once when that module is already loaded, else when it is imported later
(a one-shot import hook that steps aside after that import).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TABLE_MODULE = "torch.distributed.optim.utils"


def register(optimizer_class, functional_class) -> None:
    """Make ``functional_class`` what ZeroRedundancyOptimizer uses for ``optimizer_class`` when
    it overlaps with DDP; now if torch's table is loaded, else as soon as it is."""
    table = sys.modules.get(TABLE_MODULE)
    if table is not None:
        table.register_functional_optim(optimizer_class, functional_class)
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport(optimizer_class, functional_class))


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when torch's table module is about to be imported, it hands the
    import to the usual finder and registers right after the module has run."""

    def __init__(self, optimizer_class, functional_class):
        self.classes = (optimizer_class, functional_class)

    def find_spec(self, name, path, target=None):
        if name != TABLE_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader, self.classes)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader, classes):
        self.loader, self.classes = loader, classes

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        module.register_functional_optim(*self.classes)
