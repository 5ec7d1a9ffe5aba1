"""A shape's vCPUs against the quota of its machine series, through the fake's ``regions.get``."""

from __future__ import annotations

import pytest

from runner.backends.gcp.quota import cpu_quota_metric
from runner.backends.gcp.shapes.groups import Shapes
from runner.backends.gcp.shapes.model import Shape, ShapeError
from tests.gcp.conftest import MakeCompute
from tests.gcp.fake_compute import sleeper

ZONE = "us-central1-a"
GROUP = "cflow-workers"
LISTED = {
    metric: (24.0, 0.0)
    for metric in ("CPUS", "N2_CPUS", "N2D_CPUS", "C2_CPUS", "C3_CPUS", "A2_CPUS", "G2_CPUS")
}


@pytest.mark.parametrize(
    ("machine_type", "spot", "quotas", "metric"),
    [
        ("n2-standard-8", False, LISTED, "N2_CPUS"),
        ("n2d-highmem-4", False, LISTED, "N2D_CPUS"),
        ("c3-standard-8", False, LISTED, "C3_CPUS"),
        ("g2-standard-8", False, LISTED, "G2_CPUS"),
        ("n1-standard-8", False, LISTED, "CPUS"),  # n1 and e2 have no quota of their own
        ("e2-standard-2", False, LISTED, "CPUS"),
        ("c2d-standard-8", False, LISTED, "CPUS"),  # a series the region does not list
        ("n2-standard-8", True, LISTED, "N2_CPUS"),  # no preemptible quota: the series'
        ("n2-standard-8", True, {**LISTED, "PREEMPTIBLE_CPUS": (8.0, 0.0)}, "PREEMPTIBLE_CPUS"),
        ("n2-standard-8", False, {**LISTED, "PREEMPTIBLE_CPUS": (8.0, 0.0)}, "N2_CPUS"),
    ],
)
def test_a_vms_cpus_count_against_its_series_quota(
    machine_type: str, spot: bool, quotas: dict[str, tuple[float, float]], metric: str
) -> None:
    assert cpu_quota_metric(machine_type, spot=spot, quotas=quotas) == metric


def test_an_n2_shape_is_checked_against_n2_cpus_not_cpus(fake_compute: MakeCompute) -> None:
    base = {"SSD_TOTAL_GB": (2048.0, 0.0), "PREEMPTIBLE_CPUS": (0.0, 0.0)}
    fake = fake_compute(spawn=sleeper, quotas={**base, "CPUS": (0.0, 0.0), "N2_CPUS": (100.0, 0.0)})
    s = Shapes(project=fake.group.project, group=GROUP, zone=ZONE)
    try:
        s.ensure(Shape.parse(machine_type="n2-standard-8"))  # CPUS is 0: N2_CPUS holds it
        with pytest.raises(ShapeError, match=r"needs 8 CPUS, the project has 0 free"):
            s.ensure(Shape.parse(machine_type="n1-standard-8"))
    finally:
        s.close()
    fake.quotas = {**base, "CPUS": (100.0, 0.0), "N2_CPUS": (24.0, 20.0)}
    s = Shapes(project=fake.group.project, group=GROUP, zone=ZONE)
    try:
        with pytest.raises(ShapeError) as refused:
            s.ensure(Shape.parse(machine_type="n2-standard-16"))
    finally:
        s.close()
    assert str(refused.value) == (
        "not one Spot n2-standard-16 VM fits in us-central1: it needs 16 N2_CPUS, the project "
        "has 4 free (limit 24); ask for N2_CPUS 36 in us-central1 on the console's Quotas page"
    )
