"""The operator's generation pools: which vLLM endpoints serve which models, for whom.

Pools come from a file (``DISPATCH_POOLS_FILE``: TOML, YAML or JSON) or from the
environment (``DISPATCH_POOLS``: the same document as JSON). With neither, the single
endpoint ``LLM_BASE_URL`` is one shared pool serving every tier. Changing the file needs
no code change; it is read at start.

A pool is ``shared`` (serves the tiers it lists, every tier if none) or ``dedicated``
(serves only the tenants it lists, by slug or id). ``region`` pins data residency: a
tenant with a ``data_region`` is only ever routed to pools of that region. ``routing``
names how a pool picks the replica for a request (:class:`Routing`; the policies
themselves are in :mod:`app.inference.routing`).
"""

from __future__ import annotations

import enum
import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from app.db.models import Tier
from app.quotas.costs import CostRule, ModelPrice, Price, Pricing
from app.settings import Settings

PoolName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
Endpoint = Annotated[str, StringConstraints(pattern=r"^https?://[^\s/]+(/[^\s]*)?/v1/?$")]
Region = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]


class PoolKind(enum.StrEnum):
    """Who a pool serves."""

    shared = "shared"
    dedicated = "dedicated"


class Routing(enum.StrEnum):
    """How a pool picks the replica for a request (a policy of :mod:`app.inference.routing`)."""

    least_loaded = "least_loaded"  # least loaded, with tenant affinity (the default)
    least_latency = "least_latency"  # lowest expected completion time (measured durations)


class PoolConfig(BaseModel):
    """One pool of vLLM replicas serving the same models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: PoolName
    models: Annotated[list[str], Field(min_length=1)]
    endpoints: Annotated[list[Endpoint], Field(min_length=1, description="Base URLs ending in /v1")]
    kind: PoolKind = PoolKind.shared
    tenants: list[str] = Field(default_factory=list, description="dedicated: tenant slugs or ids")
    tiers: list[Tier] = Field(default_factory=list, description="shared: tiers served; [] = all")
    max_in_flight: int = Field(default=32, ge=1, le=100_000, description="per replica")
    priority_scheduling: bool = False  # the servers run --scheduling-policy priority
    routing: Routing = Routing.least_loaded
    region: Region | None = None
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$",
                                    description="environment variable holding the servers' key")
    # Metering: GPUs behind each replica (0 = not our GPUs, e.g. a hosted API: no
    # GPU-seconds), how a request is charged, and the GPU-hour price for gpu_time/max.
    gpus_per_replica: float = Field(default=1.0, ge=0, le=1024)
    cost_rule: CostRule = CostRule.tokens
    gpu_hour_usd: Price | None = None

    @model_validator(mode="after")
    def _kind_matches_members(self) -> PoolConfig:
        if self.kind is PoolKind.dedicated and not self.tenants:
            raise ValueError(f"dedicated pool {self.name!r} lists no tenants")
        if self.kind is PoolKind.shared and self.tenants:
            raise ValueError(f"shared pool {self.name!r} lists tenants; make it dedicated")
        if self.kind is PoolKind.dedicated and self.tiers:
            raise ValueError(f"dedicated pool {self.name!r} lists tiers; it serves its tenants")
        if len(set(self.endpoints)) != len(self.endpoints):
            raise ValueError(f"pool {self.name!r} lists an endpoint twice")
        if self.cost_rule is not CostRule.tokens and self.gpu_hour_usd is None:
            raise ValueError(f"pool {self.name!r} charges by {self.cost_rule.value} but sets "
                             "no gpu_hour_usd")
        if self.cost_rule is not CostRule.tokens and self.gpus_per_replica == 0:
            raise ValueError(f"pool {self.name!r} charges by GPU time but has no GPUs "
                             "(gpus_per_replica = 0)")
        return self

    def api_key(self) -> str | None:
        """The servers' API key, read from the environment variable the pool names."""
        if self.api_key_env is None:
            return None
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ValueError(f"pool {self.name!r}: environment variable {self.api_key_env} "
                             "is not set")
        return value

    def serves_tenant(self, slug: str, tenant_id: str) -> bool:
        """True if this dedicated pool names the tenant."""
        return slug in self.tenants or tenant_id in self.tenants


class PoolsConfig(BaseModel):
    """Every pool; a tenant is in at most one dedicated pool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pools: Annotated[list[PoolConfig], Field(min_length=1)]
    # USD per million tokens per model; generation and embedding models alike.
    prices: dict[str, ModelPrice] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> PoolsConfig:
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError("pool names must be unique")
        for pool in self.pools:  # with a price table, a token-charging pool prices all
            unpriced = [m for m in pool.models if m not in self.prices]
            if self.prices and pool.cost_rule is not CostRule.gpu_time and unpriced:
                raise ValueError(f"pool {pool.name!r} charges by tokens but the price table "
                                 f"has no price for {', '.join(unpriced)}")
        owners: dict[str, str] = {}
        for pool in self.pools:
            for tenant in pool.tenants:
                if tenant in owners:
                    raise ValueError(f"tenant {tenant!r} is in two dedicated pools: "
                                     f"{owners[tenant]!r} and {pool.name!r}")
                owners[tenant] = pool.name
        return self

    def pool(self, name: str) -> PoolConfig | None:
        """The pool of that name."""
        return next((p for p in self.pools if p.name == name), None)

    def models(self) -> list[str]:
        """Every model some pool serves, in the order first listed."""
        seen: dict[str, None] = {}
        for pool in self.pools:
            seen.update(dict.fromkeys(pool.models))
        return list(seen)


class PoolsConfigError(ValueError):
    """The pools file or variable is missing, unreadable or invalid."""


def parse_pools(text: str, fmt: str) -> PoolsConfig:
    """Parse a pools document: ``fmt`` is ``toml``, ``yaml`` or ``json``."""
    try:
        data: Any
        if fmt == "toml":
            data = tomllib.loads(text)
        elif fmt in ("yaml", "yml"):
            data = yaml.safe_load(text)
        elif fmt == "json":
            data = json.loads(text)
        else:
            raise PoolsConfigError(f"unknown pools format {fmt!r} (toml, yaml or json)")
        return PoolsConfig.model_validate(data)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise PoolsConfigError(f"the pools document is not valid {fmt}: {exc}") from exc
    except ValidationError as exc:
        raise PoolsConfigError(f"invalid pools configuration: {exc}") from exc


def parse_prices(text: str | None) -> dict[str, ModelPrice]:
    """The price table given alone as JSON (``DISPATCH_PRICES``, for setups without a
    pools file): ``{"model": {"prompt_per_mtok": ..., ...}}``."""
    if not text:
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise PoolsConfigError("DISPATCH_PRICES must be a JSON object of model prices")
        return {str(k): ModelPrice.model_validate(v) for k, v in data.items()}
    except json.JSONDecodeError as exc:
        raise PoolsConfigError(f"DISPATCH_PRICES is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        raise PoolsConfigError(f"invalid DISPATCH_PRICES: {exc}") from exc


def load_pools(path: Path | None, inline: str | None, base_url: str | None,
               models: list[str], max_in_flight: int,
               prices: str | None = None) -> PoolsConfig | None:
    """The configured pools: the file, else the inline JSON, else one shared pool at
    ``base_url``; None when there is nothing to route to. ``prices``
    (``DISPATCH_PRICES``) adds a price table to a document that has none."""
    config = _load_pools(path, inline, base_url, models, max_in_flight)
    table = parse_prices(prices)
    if config is None or not table or config.prices:
        return config
    try:
        return PoolsConfig.model_validate({**config.model_dump(), "prices": table})
    except ValidationError as exc:
        raise PoolsConfigError(f"invalid pools configuration with DISPATCH_PRICES: {exc}") \
            from exc


def _load_pools(path: Path | None, inline: str | None, base_url: str | None,
                models: list[str], max_in_flight: int) -> PoolsConfig | None:
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PoolsConfigError(f"cannot read the pools file {path}: {exc}") from exc
        return parse_pools(text, path.suffix.lstrip(".").lower())
    if inline:
        return parse_pools(inline, "json")
    if base_url:
        return PoolsConfig(pools=[PoolConfig(
            name="default", models=models, endpoints=[base_url], max_in_flight=max_in_flight)])
    return None


def configured_pools(settings: Settings) -> PoolsConfig | None:
    """The pools (and price table) these settings configure."""
    d = settings.dispatch
    return load_pools(d.pools_file, d.pools, settings.llm.base_url, settings.llm.models,
                      d.max_in_flight, d.prices)


def configured_pricing(settings: Settings) -> Pricing:
    """The price table and the pools' cost rules: the pools document's, else
    ``DISPATCH_PRICES`` alone."""
    pools = configured_pools(settings)
    return Pricing.of(pools, parse_prices(settings.dispatch.prices) if pools is None else None)
