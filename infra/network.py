"""A private network for the workers: no public IPs, no inbound traffic, egress through NAT.

The VMs need outbound access (Google APIs, and PyPI for the worker's dependencies) and no
inbound access at all. They get no external IP; Private Google Access carries API traffic and
Cloud NAT the rest. NAT is billed per VM-hour while VMs use it (a fraction of a Spot VM's price)
plus per GB processed (pip downloads, tens of MB per VM), and it keeps every VM unreachable
from the internet, which an external IP with a deny-all firewall would only promise.
"""

from __future__ import annotations

from cdktf_cdktf_provider_google.compute_firewall import ComputeFirewall, ComputeFirewallDeny
from cdktf_cdktf_provider_google.compute_network import ComputeNetwork
from cdktf_cdktf_provider_google.compute_router import ComputeRouter
from cdktf_cdktf_provider_google.compute_router_nat import (
    ComputeRouterNat,
    ComputeRouterNatLogConfig,
)
from cdktf_cdktf_provider_google.compute_subnetwork import (
    ComputeSubnetwork,
    ComputeSubnetworkLogConfig,
)
from constructs import Construct

SUBNET_RANGE = "10.64.0.0/20"  # 4,096 addresses: room for thousands of workers
# Flow logs at a low sampling rate: an audit trail of where the VMs connect, for little log volume.
FLOW_LOGS = ComputeSubnetworkLogConfig(
    aggregation_interval="INTERVAL_10_MIN", flow_sampling=0.1, metadata="EXCLUDE_ALL_METADATA"
)
LOWEST_PRIORITY = 65534  # below any rule someone adds on purpose, above the implied rules


class Network(Construct):
    """VPC, subnet, router with Cloud NAT, and an explicit deny of all inbound traffic.

    Attributes:
        network, subnetwork: what the instance template attaches to.
    """

    def __init__(self, scope: Construct, id: str, *, name_prefix: str, region: str) -> None:
        super().__init__(scope, id)
        self.network = ComputeNetwork(
            self, "network", name=f"{name_prefix}-net", auto_create_subnetworks=False
        )
        self.subnetwork = ComputeSubnetwork(
            self,
            "subnet",
            name=f"{name_prefix}-subnet",
            network=self.network.id,
            region=region,
            ip_cidr_range=SUBNET_RANGE,
            private_ip_google_access=True,  # APIs without NAT or public IPs
            log_config=FLOW_LOGS,
        )
        # The implied rule already denies ingress; this one states it and logs attempts.
        ComputeFirewall(
            self,
            "deny_ingress",
            name=f"{name_prefix}-deny-ingress",
            network=self.network.id,
            direction="INGRESS",
            priority=LOWEST_PRIORITY,
            deny=[ComputeFirewallDeny(protocol="all")],
            source_ranges=["0.0.0.0/0"],
        )
        router = ComputeRouter(
            self, "router", name=f"{name_prefix}-router", network=self.network.id, region=region
        )
        ComputeRouterNat(
            self,
            "nat",
            name=f"{name_prefix}-nat",
            router=router.name,
            region=region,
            nat_ip_allocate_option="AUTO_ONLY",
            source_subnetwork_ip_ranges_to_nat="ALL_SUBNETWORKS_ALL_IP_RANGES",
            log_config=ComputeRouterNatLogConfig(enable=True, filter="ERRORS_ONLY"),
        )
