"""Compute Engine's client library with only the services a command uses loaded.

``google.cloud.compute_v1``'s ``__init__`` imports all of its 80-odd services: 2 s of CPU in every
runner command that looks at the fleet, of which the runner needs at most eleven services.
The package marks those imports lazy for Python 3.15 (PEP 810, its ``__lazy_modules__``); on
older Pythons :data:`compute_v1` is the same package registered without running that
``__init__``, each name loaded when it is first asked for:

- ``compute_v1.<Service>Client``: that service's own module (``services/<service>``);
- a message or enum, ``compute_v1.Operation``: the package's ``types`` module, which every
  client loads anyway;
- anything else: the package's own ``__init__`` runs then, as a plain import would have.

Where the package is already imported (a test that imports it itself), that one is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import threading
from types import ModuleType
from typing import Any

PACKAGE = "google.cloud.compute_v1"
_lock = threading.RLock()


def _snake(name: str) -> str:
    """``InstanceGroupManagers`` -> ``instance_group_managers``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _lazy_package() -> ModuleType:
    with _lock:
        found = sys.modules.get(PACKAGE)
        if found is not None:
            return found
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or spec.loader is None:  # not installed: the plain import says so
            return importlib.import_module(PACKAGE)
        package = importlib.util.module_from_spec(spec)
        complete = False

        def resolve(name: str) -> Any:
            nonlocal complete
            with _lock:
                if complete:
                    raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
                if name.startswith("__"):  # __version__, __all__: the package's own
                    return _complete(name)
                if importlib.util.find_spec(f"{PACKAGE}.{name}") is not None:
                    value: Any = importlib.import_module(f"{PACKAGE}.{name}")
                elif name.endswith("Client"):
                    service = importlib.import_module(
                        f"{PACKAGE}.services.{_snake(name.removesuffix('Client'))}"
                    )
                    value = getattr(service, name)
                else:
                    types = importlib.import_module(f"{PACKAGE}.types.compute")
                    if hasattr(types, name):
                        value = getattr(types, name)
                    else:  # not a client or a message: what the package's __init__ makes
                        return _complete(name)
                setattr(package, name, value)
                return value

        def _complete(name: str) -> Any:
            nonlocal complete
            complete = True
            spec.loader.exec_module(package)  # type: ignore[union-attr]
            return getattr(package, name)

        package.__getattr__ = resolve  # type: ignore[method-assign]
        sys.modules[PACKAGE] = package
        parent: Any = importlib.import_module("google.cloud")  # as an import would
        parent.compute_v1 = package
        return package


compute_v1: Any = _lazy_package()
