"""One file per method, each registering itself (sslrun.methods.registry); importing this package
imports them all, so a new method needs no edit here."""

import importlib
import pkgutil

from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.registry import METHODS, MethodSpec, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "MethodSpec", "SSLMethod", "StepOutput", "register_method"]
