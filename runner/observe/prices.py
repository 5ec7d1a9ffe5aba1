"""List prices of Compute Engine machine types, Spot and standard, for the run report's cost.

The built-in table is deliberately small and documented; a user with other regions, discounts or
this month's Spot prices points ``runner report --prices FILE`` (or ``$CFLOW_PRICES``) at a TOML
or JSON file that overrides it::

    # prices.toml: USD per VM-hour
    [machine_types."n2-highmem-8"]
    standard = 0.524056
    spot = 0.127
    [families.e2]              # or per family: per-vCPU and per-GiB hourly rates
    vcpu = 0.021811
    memory_gib = 0.002923
    spot_fraction = 0.30       # Spot price as a share of the standard one

Where the numbers come from (us-central1, USD, checked 2026-12-01):
- Standard (on-demand) rates per vCPU-hour and GiB-hour of the predefined E2, N2, N2D, N1 and
  C2 types, and the shared-core E2 prices, are Google's list prices from
  https://cloud.google.com/compute/vm-instance-pricing (a machine type costs
  vCPUs x vCPU rate + GiB x memory rate).
- Spot prices are dynamic: Google advertises 60-91% off the standard price and may change Spot
  prices up to once every 30 days (https://cloud.google.com/compute/docs/instances/spot,
  https://cloud.google.com/spot-vms/pricing). The table estimates Spot as a fixed share of the
  standard price (:data:`SPOT_FRACTION`); put real Spot prices in an override file.
- Billing: each VM is charged a minimum of one minute, then per second (same page).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.errors import ConfigError

PRICES_DATE = "2026-12-01"
REGION = "us-central1"
SPOT_FRACTION = 0.30  # Spot as a share of standard: within Google's advertised 60-91% off
MINIMUM_BILLED_SECONDS = 60.0  # Compute Engine bills at least a minute per VM


@dataclass(frozen=True)
class FamilyRate:
    vcpu: float  # USD per vCPU-hour, standard
    memory_gib: float  # USD per GiB-hour, standard
    spot_fraction: float = SPOT_FRACTION


# Standard (on-demand) resource rates, us-central1 (see the module docstring for the source).
FAMILIES: dict[str, FamilyRate] = {
    "e2": FamilyRate(vcpu=0.021811, memory_gib=0.002923),
    "n2": FamilyRate(vcpu=0.031611, memory_gib=0.004237),
    "n2d": FamilyRate(vcpu=0.027502, memory_gib=0.003686),
    "n1": FamilyRate(vcpu=0.031611, memory_gib=0.004237),
    "c2": FamilyRate(vcpu=0.03398, memory_gib=0.00455),
}

# GiB of memory per vCPU of each predefined class.
_MEMORY_PER_VCPU: dict[tuple[str, str], float] = {
    **{(f, "standard"): 4.0 for f in ("e2", "n2", "n2d", "c2")},
    **{(f, "highmem"): 8.0 for f in ("e2", "n2", "n2d")},
    **{(f, "highcpu"): 1.0 for f in ("e2", "n2", "n2d")},
    ("n1", "standard"): 3.75,
    ("n1", "highmem"): 6.5,
    ("n1", "highcpu"): 0.9,
}

# Shared-core E2 types are priced on their own (standard USD per hour).
_SHARED_CORE: dict[str, float] = {
    "e2-micro": 0.008376,
    "e2-small": 0.016751,
    "e2-medium": 0.033503,
}

_PREDEFINED = re.compile(r"^(?P<family>[a-z0-9]+)-(?P<cls>standard|highmem|highcpu)-(?P<n>\d+)$")


@dataclass(frozen=True)
class Price:
    machine_type: str
    standard: float  # USD per VM-hour
    spot: float
    source: str  # "table", "override" or "override family"

    def hourly(self, spot: bool) -> float:
        return self.spot if spot else self.standard


@dataclass
class PriceTable:
    """Looks up a machine type's hourly price; built-in rates plus any overrides."""

    families: dict[str, FamilyRate] = field(default_factory=lambda: dict(FAMILIES))
    machine_types: dict[str, Price] = field(default_factory=dict)
    overridden_families: set[str] = field(default_factory=set)
    origin: str = f"built-in list prices, {REGION}, {PRICES_DATE}"

    def lookup(self, machine_type: str) -> Price | None:
        """The price of ``machine_type``, or None when neither the table nor an override has it."""
        if machine_type in self.machine_types:
            return self.machine_types[machine_type]
        if machine_type in _SHARED_CORE:
            standard = _SHARED_CORE[machine_type]
            return Price(machine_type, standard, standard * SPOT_FRACTION, "table")
        match = _PREDEFINED.match(machine_type)
        if match is None:
            return None
        family, cls, vcpus = match["family"], match["cls"], int(match["n"])
        rate = self.families.get(family)
        per_vcpu = _MEMORY_PER_VCPU.get((family, cls))
        if rate is None or per_vcpu is None:
            return None
        standard = vcpus * rate.vcpu + vcpus * per_vcpu * rate.memory_gib
        source = "override family" if family in self.overridden_families else "table"
        return Price(
            machine_type, round(standard, 6), round(standard * rate.spot_fraction, 6), source
        )

    def cost(self, machine_type: str, seconds: float, *, spot: bool = True) -> float | None:
        """USD for one VM of ``machine_type`` up for ``seconds`` (one-minute minimum)."""
        price = self.lookup(machine_type)
        if price is None:
            return None
        return price.hourly(spot) * max(seconds, MINIMUM_BILLED_SECONDS) / 3600.0


def load_prices(path: Path | None = None, env: Mapping[str, str] | None = None) -> PriceTable:
    """The built-in table with the overrides in ``path`` (or ``$CFLOW_PRICES``) applied.

    Raises:
        ConfigError: the file is missing, unreadable or malformed (says which entry).
    """
    env = os.environ if env is None else env
    if path is None and env.get("CFLOW_PRICES"):
        path = Path(env["CFLOW_PRICES"])
    table = PriceTable()
    if path is None:
        return table
    data = _read(path)
    for name, entry in _section(data, "families", path).items():
        current = table.families.get(name)
        try:
            table.families[name] = FamilyRate(
                vcpu=float(entry.get("vcpu", current.vcpu if current else "x")),
                memory_gib=float(entry.get("memory_gib", current.memory_gib if current else "x")),
                spot_fraction=float(entry.get("spot_fraction", SPOT_FRACTION)),
            )
        except (TypeError, ValueError, AttributeError):
            raise ConfigError(
                f"{path}: families.{name} needs numbers vcpu and memory_gib (USD per hour)"
            ) from None
        table.overridden_families.add(name)
    for name, entry in _section(data, "machine_types", path).items():
        try:
            standard = float(entry["standard"])
            spot = float(entry.get("spot", standard * SPOT_FRACTION))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(
                f"{path}: machine_types.{name} needs a number `standard` (and `spot`), USD per hour"
            ) from None
        table.machine_types[name] = Price(name, standard, spot, "override")
    table.origin = f"{path} over built-in list prices ({REGION}, {PRICES_DATE})"
    return table


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"price file {path} cannot be read: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"price file {path} is not valid {path.suffix or 'TOML'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"price file {path} must hold a table with machine_types or families")
    return data


def _section(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"price file {path}: `{name}` must be a table")
    return section
