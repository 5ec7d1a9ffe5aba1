"""Shared fixtures for the infra tests: one synthesis of the stack per test session.

The stack is synthesized exactly as ``cdktf synth`` does it: ``python3 infra/main.py`` (the app of
``cdktf.json``) in a subprocess, with ``CDKTF_OUTDIR`` pointing at a temporary directory. Importing
the provider takes seconds, so this happens once; tests assert on the JSON it writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
STACK = "cflow"


@dataclass(frozen=True)
class Synth:
    """The synthesized stack: its directory (``cdktf.out/stacks/cflow``) and its JSON."""

    stack_dir: Path
    tf: dict[str, Any]

    @property
    def json_file(self) -> Path:
        return self.stack_dir / "cdk.tf.json"

    def resources(self, type_: str) -> list[dict[str, Any]]:
        """Every resource of one Terraform type, without the cdktf metadata."""
        return [_strip(body) for body in self.tf.get("resource", {}).get(type_, {}).values()]

    def resource(self, type_: str, **match: Any) -> dict[str, Any]:
        """The one resource of ``type_`` whose properties include ``match``."""
        found = [r for r in self.resources(type_) if all(r.get(k) == v for k, v in match.items())]
        assert len(found) == 1, f"expected one {type_} with {match}, found {len(found)}"
        return found[0]

    def ref(self, type_: str, attribute: str, **match: Any) -> str:
        """``${type.logical_id.attribute}`` for the one resource matching ``match``."""
        for logical_id, body in self.tf["resource"][type_].items():
            if all(body.get(k) == v for k, v in match.items()):
                return f"${{{type_}.{logical_id}.{attribute}}}"
        raise AssertionError(f"no {type_} with {match}")


def _strip(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "//"}


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synth]:
    outdir = tmp_path_factory.mktemp("cdktf.out")
    env = {
        **os.environ,
        "CDKTF_OUTDIR": str(outdir),
        "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
    }
    app = json.loads((REPO / "cdktf.json").read_text())["app"].split()
    assert app[-1] == "infra/main.py"
    proc = subprocess.run(
        [sys.executable, app[-1]], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"synth failed:\n{proc.stdout}\n{proc.stderr}"
    stack_dir = outdir / "stacks" / STACK
    yield Synth(stack_dir=stack_dir, tf=json.loads((stack_dir / "cdk.tf.json").read_text()))
