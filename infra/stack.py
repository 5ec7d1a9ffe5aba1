"""The CFlow stack: every construct wired together, and the outputs the runner reads."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cdktf import (
    App,
    TerraformOutput,
    TerraformProvider,
    TerraformProviderGeneratorMetadata,
    TerraformStack,
    Token,
)
from cdktf_cdktf_provider_google.provider import GoogleProvider
from constructs import Construct

from infra.compute import Compute
from infra.identity import Identity
from infra.messaging import Messaging
from infra.network import Network
from infra.package import WorkerPackage
from infra.registry import Registry
from infra.storage import Storage
from infra.variables import Inputs, declare_inputs
from runner.backends.gcp.wheels import VM_PYTHON

STACK_NAME = "cflow"  # the key of the outputs file: {"cflow": {"bucket": ...}}
GOOGLE_BETA_VERSION = "6.50.0"  # the same release as the prebuilt GA provider's
REPO = Path(__file__).resolve().parent.parent


class CflowStack(TerraformStack):
    """Bucket, messaging, identity, network and the worker group, from the variables.

    Outputs (``cdktf deploy --outputs-file``), all names rather than paths: project, region, zone
    (empty for a regional group), bucket, work_topic, work_subscription, events_topic,
    events_subscription, dead_letter_topic, dead_letter_subscription, group, group_scope
    (``zonal`` or ``regional``), worker_service_account, image_repository (where run images
    go: ``<region>-docker.pkg.dev/<project>/<repository>``; the workers may only read it),
    gpu_image, container_image, worker_python (the VMs' Python minor version, ``3.11``).
    """

    def __init__(
        self,
        scope: Construct,
        id: str = STACK_NAME,
        *,
        repo: Path = REPO,
        build_dir: Path | None = None,
    ) -> None:
        super().__init__(scope, id)
        inputs = declare_inputs(self)
        beta = self._providers(inputs)
        group_name = f"{inputs.name_prefix}-workers"
        instance_name_prefix = f"{inputs.name_prefix}-worker"

        storage = Storage(
            self,
            "storage",
            project=inputs.project,
            location=inputs.region,
            name_prefix=inputs.name_prefix,
            bucket_name=inputs.bucket_name,
            retention_days=inputs.retention_days,
        )
        messaging = Messaging(
            self,
            "messaging",
            name_prefix=inputs.name_prefix,
            project=inputs.project,
            max_delivery_attempts=inputs.max_delivery_attempts,
            beta=beta,
        )
        identity = self._identity(inputs, storage, messaging)
        registry = Registry(
            self,
            "registry",
            project=inputs.project,
            region=inputs.region,
            name_prefix=inputs.name_prefix,
            reader_member=identity.service_account.member,
        )
        network = Network(self, "network", name_prefix=inputs.name_prefix, region=inputs.region)
        package = WorkerPackage(
            self,
            "worker_package",
            bucket=storage.bucket,
            repo=repo,
            build_dir=build_dir or Path(App.of(self).outdir) / "worker-package",
        )
        compute = self._compute(
            inputs,
            group_name=group_name,
            instance_name_prefix=instance_name_prefix,
            network=network,
            identity=identity,
            worker_metadata=_worker_metadata(inputs, group_name, storage, messaging, package),
        )
        self._outputs(inputs, group_name, storage, messaging, identity, registry, compute)

    def _providers(self, inputs: Inputs) -> TerraformProvider:
        """Declare the google and google-beta providers; return google-beta."""
        GoogleProvider(
            self,
            "google",
            project=inputs.project,
            region=inputs.region,
            default_labels={"cflow_deployment": inputs.name_prefix},  # on every labelled resource
        )
        # google-beta, for the one resource only it has (the Pub/Sub service agent). No prebuilt
        # bindings are needed: it is declared as a plain provider block.
        beta = TerraformProvider(
            self,
            "google_beta",
            terraform_resource_type="google-beta",
            terraform_provider_source="hashicorp/google-beta",
            terraform_generator_metadata=TerraformProviderGeneratorMetadata(
                provider_name="google-beta", provider_version=GOOGLE_BETA_VERSION
            ),
        )
        beta.add_override("project", inputs.project)
        beta.add_override("region", inputs.region)
        return beta

    def _identity(
        self,
        inputs: Inputs,
        storage: Storage,
        messaging: Messaging,
    ) -> Identity:
        """The workers' service account, with access to the bucket and the topics."""
        return Identity(
            self,
            "identity",
            project=inputs.project,
            name_prefix=inputs.name_prefix,
            bucket=storage.bucket,
            work_topic=messaging.work_topic,
            work_subscription=messaging.work_subscription,
            events_topic=messaging.events_topic,
            input_buckets=inputs.input_buckets,
        )

    def _compute(
        self,
        inputs: Inputs,
        *,
        group_name: str,
        instance_name_prefix: str,
        network: Network,
        identity: Identity,
        worker_metadata: Mapping[str, str],
    ) -> Compute:
        """The worker group, on the network's subnet, running as the workers' service account."""
        return Compute(
            self,
            "compute",
            name_prefix=inputs.name_prefix,
            region=inputs.region,
            zone=inputs.zone,
            zones=inputs.zones,
            group_name=group_name,
            instance_name_prefix=instance_name_prefix,
            machine_type=inputs.machine_type,
            disk_size_gb=inputs.disk_size_gb,
            spot=inputs.spot,
            image_family=inputs.image_family,
            image_project=inputs.image_project,
            shard_count=inputs.shard_count,
            subnetwork=network.subnetwork,
            service_account_email=identity.service_account.email,
            worker_metadata=worker_metadata,
        )

    def _outputs(
        self,
        inputs: Inputs,
        group_name: str,
        storage: Storage,
        messaging: Messaging,
        identity: Identity,
        registry: Registry,
        compute: Compute,
    ) -> None:
        """Declare the outputs the runner reads (see the class docstring)."""
        outputs: dict[str, str] = {
            "project": inputs.project,
            "region": inputs.region,
            "zone": inputs.zone,
            "bucket": storage.bucket.name,
            "work_topic": messaging.work_topic.name,
            "work_subscription": messaging.work_subscription.name,
            "events_topic": messaging.events_topic.name,
            "events_subscription": messaging.events_subscription.name,
            "dead_letter_topic": messaging.dead_letter_topic.name,
            "dead_letter_subscription": messaging.dead_letter_subscription.name,
            "group": group_name,
            "group_scope": compute.group_scope,
            "worker_service_account": identity.service_account.email,
            "image_repository": registry.url,
            "gpu_image": inputs.gpu_image,  # read by the runner for machine shapes with GPUs
            "container_image": inputs.container_image,  # and for runs with --image
            # The workers' Python (the image's, which the wheelhouse is resolved for): cflow
            # refuses functions pickled by another minor version before publishing them.
            "worker_python": VM_PYTHON,
        }
        for name, value in outputs.items():
            depends = compute.groups if name in ("group", "group_scope") else None
            TerraformOutput(self, name, value=value, depends_on=depends)


def _worker_metadata(
    inputs: Inputs,
    group_name: str,
    storage: Storage,
    messaging: Messaging,
    package: WorkerPackage,
) -> dict[str, str]:
    """The worker VMs' configuration, as instance metadata.

    Read by infra/scripts/startup.sh, which turns it into the worker's CFLOW_* environment.
    """
    return {
        "cflow-project": inputs.project,
        "cflow-region": inputs.region,
        "cflow-zone": inputs.zone,
        "cflow-group": group_name,
        "cflow-bucket": storage.bucket.name,
        "cflow-work-topic": messaging.work_topic.name,
        "cflow-subscription": messaging.work_subscription.name,
        "cflow-events-topic": messaging.events_topic.name,
        "cflow-slots": Token.as_string(inputs.slots),
        "cflow-idle-timeout": Token.as_string(inputs.idle_timeout),
        "cflow-max-vm-hours": Token.as_string(inputs.max_vm_hours),
        "cflow-worker-package": package.url,
        "cflow-worker-sha256": package.sha256,
        "cflow-wheelhouse": package.wheelhouse_url,
        "cflow-wheelhouse-sha256": package.wheelhouse_sha256,
    }
