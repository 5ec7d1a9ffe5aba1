"""A shaped template boots from copies of the worker's package that no later deploy deletes.

The stack's worker wheel and wheelhouse are Terraform's objects, named by their SHA-256: a deploy
of a new worker deletes the old ones. A shape's template, made before that deploy and still
booting VMs for a live run, must not name them. Against the fake Compute API and the GCS emulator.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from runner.backends.gcp.shapes.groups import Shapes
from runner.backends.gcp.shapes.model import Shape
from runner.backends.gcp.wheels import KEPT_PACKAGES
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute
from tests.gcp.fake_compute import FakeCompute, sleeper
from worker.backends.gcp.gcs import GcsStore

pytestmark = pytest.mark.emulator

ZONE = "us-central1-a"
GROUP = "cflow-workers"
WHEEL = "worker/ab12/cflow_worker-0.1.0-py3-none-any.whl"
HOUSE = "worker/cd34/wheelhouse-cd34.tar"
QUOTAS = {"CPUS": (64.0, 0.0), "PREEMPTIBLE_CPUS": (0.0, 0.0), "SSD_TOTAL_GB": (2048.0, 0.0)}


@pytest.fixture
def store(deployment: Deployment) -> GcsStore:
    store = GcsStore(deployment.bucket)
    store.put(WHEEL, b"the worker wheel")
    store.put(HOUSE, b"its dependencies")
    return store


@pytest.fixture
def fake(fake_compute: MakeCompute, store: GcsStore) -> FakeCompute:
    metadata = {
        "cflow-bucket": store.bucket_name,
        "cflow-worker-package": store.url(WHEEL),
        "cflow-worker-sha256": "ab12",
        "cflow-wheelhouse": store.url(HOUSE),
        "cflow-wheelhouse-sha256": "cd34",
    }
    return fake_compute(spawn=sleeper, quotas=dict(QUOTAS), metadata=metadata)


@pytest.fixture
def shapes(fake: FakeCompute) -> Iterator[Shapes]:
    s = Shapes(project=fake.group.project, group=GROUP, zone=ZONE)
    yield s
    s.close()


def _metadata(fake: FakeCompute, template: str) -> dict[str, str]:
    items = fake.templates[template]["properties"]["metadata"]["items"]
    return {str(i["key"]): str(i["value"]) for i in items}


def test_a_shape_boots_from_kept_copies_a_redeploy_does_not_delete(
    fake: FakeCompute, shapes: Shapes, store: GcsStore
) -> None:
    made = shapes.ensure(Shape.parse(machine_type="n1-standard-8"))
    items = _metadata(fake, made.template)
    kept_wheel = f"{KEPT_PACKAGES}ab12/cflow_worker-0.1.0-py3-none-any.whl"
    kept_house = f"{KEPT_PACKAGES}cd34/wheelhouse-cd34.tar"
    assert items["cflow-worker-package"] == store.url(kept_wheel)
    assert items["cflow-wheelhouse"] == store.url(kept_house)
    assert items["cflow-worker-sha256"] == "ab12"  # the same bytes, checked as before

    # A deploy of a new worker deletes the stack's objects; the shape's VMs still boot.
    store.delete(WHEEL)
    store.delete(HOUSE)
    assert store.get(kept_wheel) == b"the worker wheel"
    assert store.get(kept_house) == b"its dependencies"

    # Another shape of the same worker shares the copies (nothing is copied again).
    other = shapes.ensure(Shape.parse(machine_type="n1-standard-4"))
    assert other.template != made.template
    assert _metadata(fake, other.template)["cflow-worker-package"] == store.url(kept_wheel)
