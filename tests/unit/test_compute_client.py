"""runner.backends.gcp.compute: Compute Engine's client library with only the services used
loaded, and the whole package still there for whoever asks for more. Each case runs in a fresh
interpreter (this one may have imported the package already)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_only_the_services_asked_for_are_loaded_and_they_are_the_librarys_own() -> None:
    out = _python(
        """
        import sys
        from runner.backends.gcp.compute import compute_v1
        managers = compute_v1.InstanceGroupManagersClient
        ops = compute_v1.ZoneOperationsClient
        services = sorted({m.split(".")[4] for m in sys.modules
                           if m.startswith("google.cloud.compute_v1.services.")})
        print(",".join(services))
        print(managers.__module__)
        print(compute_v1.Operation.Status.DONE.name)
        """
    )
    services, module, done = out.splitlines()
    assert services == "instance_group_managers,zone_operations"
    assert module == "google.cloud.compute_v1.services.instance_group_managers.client"
    assert done == "DONE"


def test_a_plain_import_afterwards_gets_the_whole_package() -> None:
    out = _python(
        """
        from runner.backends.gcp.compute import compute_v1
        compute_v1.ImagesClient
        from google.cloud import compute_v1 as plain
        import google.cloud.compute_v1 as dotted
        assert plain is compute_v1 is dotted
        print(plain.FirewallsClient.__name__, plain.__version__ != "")
        print(len(plain.__all__) > 100, hasattr(plain, "NetworksClient"))
        try:
            plain.NoSuchThing
        except AttributeError as e:
            print("AttributeError", "NoSuchThing" in str(e))
        """
    )
    assert out.splitlines() == ["FirewallsClient True", "True True", "AttributeError True"]


def test_a_package_imported_already_is_used_as_it_is() -> None:
    out = _python(
        """
        from google.cloud import compute_v1 as plain
        from runner.backends.gcp.compute import compute_v1
        print(compute_v1 is plain)
        """
    )
    assert out == "True"
