"""``runner doctor`` for the local backend: can this machine run a run?"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
from pathlib import Path

from runner.config import Config
from runner.engine.deployment import Check


def local_checks(cfg: Config) -> list[Check]:
    """The store folder is writable (or can be made), bash is there for shell tasks, and so on.

    Nothing is created: a store folder that does not exist yet is judged by its parent.
    """
    store = cfg.store_dir
    existing = next((p for p in (store, *store.parents) if p.exists()), Path("/"))
    writable = existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)
    detail = (
        f"{store} {'exists' if store.is_dir() else 'would be created'} and is writable"
        if writable
        else f"{existing} is not a writable folder; pass --store DIR or set CFLOW_STORE"
    )
    checks = [Check("store", writable, detail)]
    bash = shutil.which("bash")
    checks.append(
        Check("bash", bash is not None, bash or "bash is not on PATH; shell tasks need it")
    )
    version = sys.version_info
    checks.append(
        Check(
            "python",
            version >= (3, 11),
            f"{sys.executable} {version.major}.{version.minor}.{version.micro}",
        )
    )
    checks.append(Check("sqlite", True, f"SQLite {sqlite3.sqlite_version} (the local queue)"))
    return checks
