"""Which of the caller's modules are its own, shipped by value to the workers: every loaded
module whose file is not installed (under this interpreter's prefix or a site-packages
folder): under the working folder or the script's, a package installed in editable mode (its
source tree), a folder on ``PYTHONPATH``. The workers then run them as this process has them
(an edited and reloaded module's new code; on Google Cloud, modules no VM has)."""

from __future__ import annotations

import functools
import os
import site
import sys
from types import ModuleType

from worker.pyfunc.modules import INSTALLED  # on every worker: never shipped by value

# A module's file -> whether it is installed (under this interpreter's
# prefix or a site-packages folder: never shipped): a module's file does not move while a
# process runs, and a notebook maps many times over a thousand modules or more (a realpath per
# module of sys.modules on every map took 0.2 s; the prefix test alone a millisecond).
_installed: dict[str, bool] = {}


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@functools.cache
def _prefixes() -> tuple[str, ...]:
    """Where installed modules are: this interpreter's prefixes, and every site-packages
    folder (the user's, a system one on the path)."""
    folders = [sys.prefix, sys.base_prefix, sys.exec_prefix, site.getusersitepackages()]
    folders += site.getsitepackages()
    folders += [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    return tuple({os.path.realpath(p) for p in folders})


def is_installed(file: str) -> bool:
    """Whether a module's ``file`` is installed: under this interpreter's prefix or a
    site-packages folder (kept per file). One elsewhere is the caller's own, shipped by
    value: under the working folder or the script's, a package installed in editable mode
    (its source tree), a folder on ``PYTHONPATH``."""
    installed = _installed.get(file)
    if installed is None:
        path = os.path.realpath(file)
        installed = _installed[file] = any(_under(path, p) for p in _prefixes())
    return installed


def _not_installed(module: ModuleType) -> bool:
    """A module of the caller's own: one whose file is not installed (:func:`is_installed`)."""
    name = module.__name__
    if name == "__main__" or name.partition(".")[0] in INSTALLED:
        return False
    file = getattr(module, "__file__", None)
    return isinstance(file, str) and bool(file) and not is_installed(file)


def own_modules() -> tuple[str, ...]:
    """The top-level names of the caller's own modules that are loaded: shipped by value, so
    the workers run them as this process has them (an edited and reloaded module's new code;
    on Google Cloud, modules no VM has)."""
    return tuple(
        sorted(
            {
                name.partition(".")[0]
                for name, module in list(sys.modules.items())
                # An installed module known as such is passed over without a call.
                if not _installed.get(getattr(module, "__file__", None) or "", False)
                and module is not None
                and _not_installed(module)
            }
        )
    )
