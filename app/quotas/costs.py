"""What a request costs: the operator's per-model prices and each pool's cost rule.

Prices are USD per million tokens, per model (generation models and embedding models
alike). A pool charges by ``tokens`` (the model's prices), by ``gpu_time`` (the GPU
seconds attributed to the request at the pool's GPU-hour price), or by ``max`` of the
two (a floor for cheap-per-token but GPU-hungry requests such as long prompts on a big
model).
"""

from __future__ import annotations

import enum
from decimal import Decimal
from typing import Annotated

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
