"""What a request costs: the operator's per-model prices and each pool's cost rule.

Prices are USD per million tokens, per model (generation models and embedding models
alike). A pool charges by ``tokens`` (the model's prices), by ``gpu_time`` (the GPU
seconds attributed to the request at the pool's GPU-hour price), or by ``max`` of the
two (a floor for cheap-per-token but GPU-hungry requests such as long prompts on a big
model).

:class:`Pricing` holds the table and every pool's rule, built from the pools
configuration (structurally: this layer does not import the generation pools), and
prices a finished request by the pool it ran on.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Protocol

from pydantic import BaseModel, ConfigDict, Field

MILLION = Decimal(1_000_000)
SECONDS_PER_HOUR = Decimal(3600)
USD_PLACES = Decimal("0.00000001")  # usage_events.cost_usd is NUMERIC(18, 8)
Price = Annotated[Decimal, Field(ge=0, le=1_000_000)]


class CostRule(enum.StrEnum):
    """How a pool turns a request into money."""

    tokens = "tokens"
    gpu_time = "gpu_time"
    max = "max"


class ModelPrice(BaseModel):
    """USD per million tokens of one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_per_mtok: Price = Decimal(0)
    completion_per_mtok: Price = Decimal(0)
    # Prompt tokens the engine served from its prefix cache; None = the prompt price.
    cached_prompt_per_mtok: Price | None = None


def token_cost(price: ModelPrice | None, prompt: int, completion: int, cached: int = 0) -> Decimal:
    """The request's tokens at the model's prices (0 for a model without a price)."""
    if price is None:
        return Decimal(0)
    cached = min(max(cached, 0), prompt)
    cached_rate = (price.cached_prompt_per_mtok if price.cached_prompt_per_mtok is not None
                   else price.prompt_per_mtok)
    total = ((prompt - cached) * price.prompt_per_mtok + cached * cached_rate
             + completion * price.completion_per_mtok)
    return (total / MILLION).quantize(USD_PLACES)


def gpu_cost(gpu_seconds: float | None, gpu_hour_usd: Decimal | None) -> Decimal:
    """GPU seconds at a GPU-hour price."""
    if gpu_seconds is None or gpu_hour_usd is None:
        return Decimal(0)
    return (Decimal(repr(gpu_seconds)) * gpu_hour_usd / SECONDS_PER_HOUR).quantize(USD_PLACES)


def request_cost(rule: CostRule, price: ModelPrice | None, gpu_hour_usd: Decimal | None, *,
                 prompt: int, completion: int, cached: int = 0,
                 gpu_seconds: float | None = None) -> Decimal:
    """What the request costs under the pool's rule."""
    by_tokens = token_cost(price, prompt, completion, cached)
    by_gpu = gpu_cost(gpu_seconds, gpu_hour_usd)
    if rule is CostRule.tokens:
        return by_tokens
    if rule is CostRule.gpu_time:
        return by_gpu
    return max(by_tokens, by_gpu)


class PricedPool(Protocol):
    """What pricing reads of a pool's configuration."""

    @property
    def name(self) -> str: ...
    @property
    def cost_rule(self) -> CostRule: ...
    @property
    def gpu_hour_usd(self) -> Decimal | None: ...


class PricedPools(Protocol):
    """What pricing reads of the pools configuration (``PoolsConfig`` is one)."""

    @property
    def pools(self) -> Sequence[PricedPool]: ...
    @property
    def prices(self) -> Mapping[str, ModelPrice]: ...


@dataclass(frozen=True)
class PoolRule:
    """How one pool charges."""

    rule: CostRule
    gpu_hour_usd: Decimal | None


@dataclass(frozen=True)
class Pricing:
    """The price table and each pool's cost rule: what a finished request costs."""

    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    rules: Mapping[str, PoolRule] = field(default_factory=dict)

    @classmethod
    def of(cls, config: PricedPools | None,
           prices: Mapping[str, ModelPrice] | None = None) -> Pricing:
        """From the pools configuration; ``prices`` is the table alone when there is
        none (``DISPATCH_PRICES`` without a pools file)."""
        if config is None:
            return cls(dict(prices or {}))
        return cls(dict(config.prices),
                   {p.name: PoolRule(p.cost_rule, p.gpu_hour_usd) for p in config.pools})

    def cost(self, pool: str | None, model: str, *, prompt: int, completion: int,
             cached: int = 0, gpu_seconds: float | None = None) -> Decimal:
        """What a request on ``pool`` costs under that pool's rule (token prices when it
        never reached a pool, or the pool is not known)."""
        price = self.prices.get(model)
        rule = self.rules.get(pool) if pool is not None else None
        if rule is None:
            return token_cost(price, prompt, completion, cached)
        return request_cost(rule.rule, price, rule.gpu_hour_usd, prompt=prompt,
                            completion=completion, cached=cached, gpu_seconds=gpu_seconds)
