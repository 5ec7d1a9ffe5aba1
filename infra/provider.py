"""The Google provider's Python package with only the resources the stack uses loaded.

``cdktf_cdktf_provider_google``'s ``__init__`` imports every one of its 1,472 resource modules
(140 MB of generated Python): 6 of the 8 seconds its import takes, in every synthesis, for the
24 resources the stack declares, and, in a venv installed without compiled bytecode, a minute of
compiling on the first one. :func:`register` puts the same package in ``sys.modules`` without
running that ``__init__``: each resource module (``cdktf_cdktf_provider_google.storage_bucket``)
imports as usual and loads the provider's jsii assembly through ``_jsii``, as it does under the
plain import. A name asked of the package itself loads that resource module, or, for anything
else the ``__init__`` defines, runs the ``__init__`` then, as the plain import would have.

Where the package is already imported, or not installed (the runner's own install), nothing is
done. :mod:`infra` registers it as it is imported, before any of its modules imports a resource.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any

PACKAGE = "cdktf_cdktf_provider_google"
_lock = threading.RLock()


def register(name: str = PACKAGE) -> ModuleType | None:
    """The provider's package (or the package ``name``), registered without its ``__init__``
    (None: not installed)."""
    with _lock:
        found = sys.modules.get(name)
        if found is not None:
            return found
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return None
        package = importlib.util.module_from_spec(spec)
        complete = False

        def resolve(attr: str) -> Any:
            nonlocal complete
            with _lock:
                if complete:
                    raise AttributeError(f"module {name!r} has no attribute {attr!r}")
                if not attr.startswith("__") and importlib.util.find_spec(f"{name}.{attr}"):
                    return importlib.import_module(f"{name}.{attr}")  # sets the attribute
                complete = True  # what only the __init__ makes (its helpers, __all__)
                spec.loader.exec_module(package)  # type: ignore[union-attr]
                return getattr(package, attr)

        package.__getattr__ = resolve  # type: ignore[method-assign]
        sys.modules[name] = package
        return package
