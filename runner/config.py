"""The runner's configuration: one typed object, resolved once.

Sources, later ones winning: defaults, the deployment's outputs file (what
``cdktf deploy --outputs-file FILE`` writes), ``CFLOW_*`` environment variables, CLI flags.
With no deployment found, the backend is the embedded local one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from worker import defaults
from worker.errors import ConfigError


class Backend(StrEnum):
    LOCAL = "local"
    GCP = "gcp"


# Deployment fields: the stack's output names, which are also the CFLOW_<NAME> variables.
DEPLOYMENT_FIELDS = (
    "project",
    "region",
    "zone",
    "bucket",
    "work_topic",
    "work_subscription",
    "events_topic",
    "events_subscription",
    "dead_letter_subscription",
    "group",
    "gpu_image",  # optional: the boot image of GPU shapes (runner.backends.gcp.shapes)
    "container_image",  # optional: the boot image of runs with --image (podman or docker)
)
REQUIRED_FOR_GCP = (
    "project",
    "bucket",
    "work_topic",
    "work_subscription",
    "events_topic",
    "events_subscription",
    "dead_letter_subscription",
    "group",
)
DEFAULT_OUTPUTS_FILES = ("cflow-outputs.json", "infra/outputs.json")


@dataclass(frozen=True)
class Config:
    backend: Backend = Backend.LOCAL
    store_dir: Path = Path(defaults.STORE_DIR)
    deployment_file: Path | None = None
    project: str | None = None
    region: str | None = None
    zone: str | None = None
    bucket: str | None = None
    work_topic: str | None = None
    work_subscription: str | None = None
    events_topic: str | None = None
    events_subscription: str | None = None
    dead_letter_subscription: str | None = None
    group: str | None = None
    gpu_image: str | None = None
    container_image: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return self.backend is Backend.LOCAL

    def describe(self) -> str:
        if self.is_local:
            return f"local backend, store {self.store_dir}"
        return f"Google Cloud backend, project {self.project}, bucket gs://{self.bucket}"


def load_outputs(path: Path) -> dict[str, Any]:
    """Read a ``cdktf deploy --outputs-file`` file: ``{stack: {output: value}}``.

    A file holding several stacks must name the one to use in ``CFLOW_STACK``.
    """
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deployment outputs file {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"deployment outputs file {path} is not readable JSON: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"deployment outputs file {path} holds no stack outputs")
    if any(name in raw for name in DEPLOYMENT_FIELDS):
        return raw  # already flat (a hand-written file)
    stacks = {k: v for k, v in raw.items() if isinstance(v, dict)}
    wanted = os.environ.get("CFLOW_STACK")
    if wanted:
        if wanted not in stacks:
            raise ConfigError(f"stack {wanted!r} not in {path}; it has {', '.join(stacks)}")
        return _flatten(stacks[wanted])
    if len(stacks) != 1:
        raise ConfigError(f"{path} holds stacks {', '.join(stacks)}; set CFLOW_STACK to pick one")
    return _flatten(next(iter(stacks.values())))


def _flatten(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Accept ``snake_case`` or cdktf's ``camelCase`` output keys, nested one level or not."""
    flat: dict[str, Any] = {}
    for key, value in outputs.items():
        if isinstance(value, dict) and "value" not in value:
            flat.update(_flatten(value))
            continue
        if isinstance(value, dict):
            value = value["value"]
        flat[_snake(key)] = value
    return flat


def _snake(name: str) -> str:
    out = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return out.replace("-", "_")


def resolve(
    *,
    local: bool = False,
    store_dir: Path | None = None,
    deployment_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Config:
    """Build the Config from every source. ``local=True`` forces the embedded backend."""
    env = os.environ if environ is None else environ
    base = cwd or Path.cwd()
    values: dict[str, Any] = {}

    path = deployment_file or (
        Path(env["CFLOW_DEPLOYMENT"]) if env.get("CFLOW_DEPLOYMENT") else None
    )
    if path is None:
        path = next((base / p for p in DEFAULT_OUTPUTS_FILES if (base / p).is_file()), None)
    if path is not None and not local:
        outputs = load_outputs(path)
        values.update({k: v for k, v in outputs.items() if k in DEPLOYMENT_FIELDS})
        values["deployment_file"] = path

    for name in DEPLOYMENT_FIELDS:
        if env.get(f"CFLOW_{name.upper()}"):
            values[name] = env[f"CFLOW_{name.upper()}"]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})

    store = store_dir or (Path(env["CFLOW_STORE"]) if env.get("CFLOW_STORE") else None)
    values["store_dir"] = store or base / defaults.STORE_DIR

    wants_gcp = not local and (env.get("CFLOW_BACKEND") == "gcp" or "deployment_file" in values)
    if env.get("CFLOW_BACKEND") not in (None, "", "local", "gcp"):
        raise ConfigError(f"CFLOW_BACKEND must be 'local' or 'gcp', not {env['CFLOW_BACKEND']!r}")
    values["backend"] = Backend.GCP if wants_gcp else Backend.LOCAL
    known = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: v for k, v in values.items() if k in known})
    if config.backend is Backend.GCP:
        missing = [n for n in REQUIRED_FOR_GCP if not getattr(config, n)]
        if missing:
            where = f" in {config.deployment_file}" if config.deployment_file else ""
            raise ConfigError(
                f"deployment is missing {', '.join(missing)}{where}; "
                "run `cdktf deploy --outputs-file cflow-outputs.json` or set CFLOW_<NAME>"
            )
        if not (config.zone or config.region):
            raise ConfigError("deployment names neither a zone nor a region for the worker group")
    return config
