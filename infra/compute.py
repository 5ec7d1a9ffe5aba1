"""The workers: a pinned image, a Spot instance template, and the managed instance group."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cdktf import Fn, IResolvable, Op, Precondition, TerraformResourceLifecycle, Token
from cdktf_cdktf_provider_google.compute_instance_group_manager import (
    ComputeInstanceGroupManager,
    ComputeInstanceGroupManagerInstanceLifecyclePolicy,
    ComputeInstanceGroupManagerUpdatePolicy,
    ComputeInstanceGroupManagerVersion,
)
from cdktf_cdktf_provider_google.compute_instance_template import (
    ComputeInstanceTemplate,
    ComputeInstanceTemplateDisk,
    ComputeInstanceTemplateNetworkInterface,
    ComputeInstanceTemplateScheduling,
    ComputeInstanceTemplateServiceAccount,
    ComputeInstanceTemplateShieldedInstanceConfig,
)
from cdktf_cdktf_provider_google.compute_region_instance_group_manager import (
    ComputeRegionInstanceGroupManager,
    ComputeRegionInstanceGroupManagerInstanceLifecyclePolicy,
    ComputeRegionInstanceGroupManagerUpdatePolicy,
    ComputeRegionInstanceGroupManagerVersion,
)
from cdktf_cdktf_provider_google.compute_subnetwork import ComputeSubnetwork
from cdktf_cdktf_provider_google.data_google_compute_image import DataGoogleComputeImage
from cdktf_cdktf_provider_google.data_google_compute_zones import DataGoogleComputeZones
from constructs import Construct

from infra.contract import DEFAULT_ACTION_ON_FAILURE

SCRIPTS = Path(__file__).parent / "scripts"
DISK_TYPE = "pd-balanced"
# The runner owns the group's size once it exists: a later deploy must not bring back the VMs it
# scaled away (nor remove VMs still working).
RUNNER_OWNED = ["target_size"]
# A new template (new worker, new image) applies to VMs created from then on; busy VMs are never
# replaced to roll it out.
UPDATE_TYPE = "OPPORTUNISTIC"
UPDATE_ACTION = "REPLACE"
# The most VMs a managed instance group holds (Compute Engine's limits): refused at deploy.
ZONAL_MAX_SIZE = 1000
REGIONAL_MAX_SIZE = 2000


def _size_limit(shard_count: float, limit: int, kind: str) -> list[Precondition]:
    hint = "; leave zone empty for a regional group (up to 2000)" if kind == "zonal" else ""
    return [
        Precondition(
            condition=Op.lte(shard_count, limit),
            error_message=f"shard_count is more VMs than a {kind} instance group holds "
            f"({limit}){hint}.",
        )
    ]


def _metadata(worker_metadata: Mapping[str, str]) -> dict[str, str]:
    """The template's metadata: the worker's settings, its boot scripts, and no SSH keys."""
    return {
        **worker_metadata,
        "startup-script": (SCRIPTS / "startup.sh").read_text(),
        "shutdown-script": (SCRIPTS / "shutdown.sh").read_text(),
        "cflow-leave-script": (SCRIPTS / "leave.sh").read_text(),  # run by startup.sh's units
        "enable-oslogin": "TRUE",
        "block-project-ssh-keys": "true",
        "serial-port-enable": "false",  # the console is still logged; no interactive access
    }


def _scheduling(spot: bool | IResolvable) -> ComputeInstanceTemplateScheduling:
    """Spot or standard scheduling, chosen at deploy time by the ``spot`` expression."""
    return ComputeInstanceTemplateScheduling(
        provisioning_model=Token.as_string(Fn.conditional(spot, "SPOT", "STANDARD")),
        preemptible=spot,
        automatic_restart=Op.not_(spot),
        on_host_maintenance=Token.as_string(Fn.conditional(spot, "TERMINATE", "MIGRATE")),
        # A preempted VM is deleted, never left stopped (a stopped one would keep its disk).
        instance_termination_action=Token.as_string(
            Fn.conditional(spot, "DELETE", Token.null_value())
        ),
    )


class Compute(Construct):
    """Image, instance template and worker group.

    A non-empty ``zone`` gives a zonal group; an empty one a regional group, which may place
    Spot VMs in any zone of the region that has capacity: ``zones``, or every zone of the region
    that is up when ``zones`` is empty. (Left unset, a regional group would use three zones only:
    "By default, a regional MIG distributes managed instances evenly across three zones",
    https://cloud.google.com/compute/docs/instance-groups/regional-migs.)

    Neither group repairs a VM that stopped by itself (``DEFAULT_ACTION_ON_FAILURE``, see
    :mod:`infra.contract`): a worker VM powers itself off only when it cannot leave its group.

    Attributes:
        image: the image data source, resolved from the family once per deploy.
        template: the instance template.
        group_scope: ``"zonal"`` or ``"regional"`` (a Terraform expression).
        groups: both group resources; exactly one of them has ``count = 1``.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        name_prefix: str,
        region: str,
        zone: str,
        zones: list[str],
        group_name: str,
        instance_name_prefix: str,
        machine_type: str,
        disk_size_gb: float,
        spot: bool | IResolvable,
        image_family: str,
        image_project: str,
        shard_count: float,
        subnetwork: ComputeSubnetwork,
        service_account_email: str,
        worker_metadata: Mapping[str, str],
    ) -> None:
        super().__init__(scope, id)
        self.image = DataGoogleComputeImage(
            self, "image", family=image_family, project=image_project
        )
        self.template = self._template(
            name_prefix=name_prefix,
            machine_type=machine_type,
            disk_size_gb=disk_size_gb,
            spot=spot,
            subnetwork=subnetwork,
            service_account_email=service_account_email,
            metadata=_metadata(worker_metadata),
        )
        # Comparisons avoid "" and 0 operands: cdktf 0.21 renders those as `undefined`.
        is_zonal = Op.gte(Fn.length_of(zone), 1)
        self.group_scope = Token.as_string(Fn.conditional(is_zonal, "zonal", "regional"))
        zonal = self._zonal_group(
            count=Token.as_number(Fn.conditional(is_zonal, 1, 0)),
            zone=zone,
            group_name=group_name,
            instance_name_prefix=instance_name_prefix,
            shard_count=shard_count,
        )
        region_zones = DataGoogleComputeZones(self, "region_zones", region=region, status="UP")
        regional = self._regional_group(
            count=Token.as_number(Fn.conditional(is_zonal, 0, 1)),
            region=region,
            zones=Token.as_list(
                Fn.conditional(Op.gte(Fn.length_of(zones), 1), zones, region_zones.names)
            ),
            group_name=group_name,
            instance_name_prefix=instance_name_prefix,
            shard_count=shard_count,
        )
        self.groups = [zonal, regional]

    def _template(
        self,
        *,
        name_prefix: str,
        machine_type: str,
        disk_size_gb: float,
        spot: bool | IResolvable,
        subnetwork: ComputeSubnetwork,
        service_account_email: str,
        metadata: Mapping[str, str],
    ) -> ComputeInstanceTemplate:
        """The worker VM's template: the pinned image, no external IP, shielded boot."""
        return ComputeInstanceTemplate(
            self,
            "template",
            name_prefix=f"{name_prefix}-",
            description="CFlow worker VM",
            machine_type=machine_type,
            disk=[
                ComputeInstanceTemplateDisk(
                    boot=True,
                    auto_delete=True,
                    source_image=self.image.self_link,  # one image, not the family's latest
                    disk_size_gb=disk_size_gb,
                    disk_type=DISK_TYPE,
                )
            ],
            # No access_config: no external IP. Egress goes through the network's Cloud NAT.
            network_interface=[ComputeInstanceTemplateNetworkInterface(subnetwork=subnetwork.id)],
            service_account=ComputeInstanceTemplateServiceAccount(
                email=service_account_email,
                scopes=["cloud-platform"],  # IAM decides, not scopes
            ),
            scheduling=_scheduling(spot),
            shielded_instance_config=ComputeInstanceTemplateShieldedInstanceConfig(
                enable_secure_boot=True, enable_vtpm=True, enable_integrity_monitoring=True
            ),
            metadata=metadata,
            # Templates are immutable: make the new one before the group lets go of the old one.
            lifecycle=TerraformResourceLifecycle(create_before_destroy=True),
        )

    def _zonal_group(
        self,
        *,
        count: float,
        zone: str,
        group_name: str,
        instance_name_prefix: str,
        shard_count: float,
    ) -> ComputeInstanceGroupManager:
        """The group in one zone (``count`` is 1 when ``zone`` is set)."""
        return ComputeInstanceGroupManager(
            self,
            "zonal_group",
            count=count,
            name=group_name,
            zone=zone,
            base_instance_name=instance_name_prefix,
            version=[
                ComputeInstanceGroupManagerVersion(
                    name="worker", instance_template=self.template.self_link_unique
                )
            ],
            target_size=shard_count,
            update_policy=ComputeInstanceGroupManagerUpdatePolicy(
                type=UPDATE_TYPE, minimal_action=UPDATE_ACTION
            ),
            instance_lifecycle_policy=ComputeInstanceGroupManagerInstanceLifecyclePolicy(
                default_action_on_failure=DEFAULT_ACTION_ON_FAILURE
            ),
            wait_for_instances=False,
            lifecycle=TerraformResourceLifecycle(
                ignore_changes=RUNNER_OWNED,
                precondition=_size_limit(shard_count, ZONAL_MAX_SIZE, "zonal"),
            ),
        )

    def _regional_group(
        self,
        *,
        count: float,
        region: str,
        zones: list[str],
        group_name: str,
        instance_name_prefix: str,
        shard_count: float,
    ) -> ComputeRegionInstanceGroupManager:
        """The group spread over the region's ``zones`` (``count`` is 1 when no zone is set)."""
        return ComputeRegionInstanceGroupManager(
            self,
            "regional_group",
            count=count,
            name=group_name,
            region=region,
            distribution_policy_zones=zones,
            # Batch work goes wherever Spot capacity is; VMs are never moved to rebalance zones.
            distribution_policy_target_shape="ANY",
            base_instance_name=instance_name_prefix,
            version=[
                ComputeRegionInstanceGroupManagerVersion(
                    name="worker", instance_template=self.template.self_link_unique
                )
            ],
            target_size=shard_count,
            update_policy=ComputeRegionInstanceGroupManagerUpdatePolicy(
                type=UPDATE_TYPE, minimal_action=UPDATE_ACTION, instance_redistribution_type="NONE"
            ),
            instance_lifecycle_policy=ComputeRegionInstanceGroupManagerInstanceLifecyclePolicy(
                default_action_on_failure=DEFAULT_ACTION_ON_FAILURE
            ),
            wait_for_instances=False,
            lifecycle=TerraformResourceLifecycle(
                ignore_changes=RUNNER_OWNED,
                precondition=_size_limit(shard_count, REGIONAL_MAX_SIZE, "regional"),
            ),
        )
