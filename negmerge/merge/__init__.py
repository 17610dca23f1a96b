"""Merge methods, each a small registered unit: adding a method is adding a file here."""

import importlib
import pkgutil

from negmerge.merge.base import METHODS, Chunk, MergeMethod, get_method, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in {"base", "streaming", "partial", "running"}:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Chunk", "MergeMethod", "get_method", "register"]
