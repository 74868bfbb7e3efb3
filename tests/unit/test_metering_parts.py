"""Costs, GPU-time attribution and metric labels, piece by piece."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.inference.pools import PoolsConfigError, load_pools, parse_pools
from app.inference.replica import CircuitBreaker, Replica
from app.observability.metrics import ServiceMetrics
from app.quotas.costs import (
    CostRule,
    ModelPrice,
    Pricing,
    gpu_cost,
    request_cost,
    token_cost,
)

PRICE = ModelPrice(prompt_per_mtok=Decimal("1.5"), completion_per_mtok=Decimal("6"),
                   cached_prompt_per_mtok=Decimal("0.3"))


def test_token_cost_charges_cached_prompt_tokens_at_their_own_price() -> None:
    # 1,000 prompt tokens of which 600 cached, 200 completion tokens:
    # 400 x 1.5 + 600 x 0.3 + 200 x 6 = 600 + 180 + 1200 = 1980 USD per million
    assert token_cost(PRICE, 1000, 200, cached=600) == Decimal("0.00198")
    no_cache_price = ModelPrice(prompt_per_mtok=Decimal("1.5"))
    assert token_cost(no_cache_price, 1000, 0, cached=600) == Decimal("0.0015")
    assert token_cost(None, 1000, 200) == 0
    # A server reporting more cached than prompt tokens cannot make the cost negative.
    assert token_cost(PRICE, 10, 0, cached=50) == Decimal("0.000003")


def test_gpu_time_and_max_rules() -> None:
    assert gpu_cost(90.0, Decimal("2.40")) == Decimal("0.06")  # 90 s at 2.40/h
    assert gpu_cost(None, Decimal("2.40")) == 0
    args = {"prompt": 1000, "completion": 200, "cached": 600}
    assert request_cost(CostRule.tokens, PRICE, Decimal("2.40"), gpu_seconds=90.0,
                        **args) == Decimal("0.00198")
    assert request_cost(CostRule.gpu_time, PRICE, Decimal("2.40"), gpu_seconds=90.0,
                        **args) == Decimal("0.06")
    assert request_cost(CostRule.max, PRICE, Decimal("2.40"), gpu_seconds=90.0,
                        **args) == Decimal("0.06")
    assert request_cost(CostRule.max, PRICE, Decimal("2.40"), gpu_seconds=0.1,
                        **args) == Decimal("0.00198")


def replica(url: str = "http://r:1/v1") -> Replica:
    return Replica(pool="p", url=url, upstream=None, cap=8,  # type: ignore[arg-type]
                   breaker=CircuitBreaker(3, 15))


def test_replica_time_is_shared_among_the_requests_running_together() -> None:
    r = replica()
    r._clock_at = 0.0
    a = r.start_request(0.0)  # A alone for 1 s, then with B for 1 s (half each)
    b = r.start_request(1.0)
    a_end = r.end_request(2.0)
    b_end = r.end_request(3.0)  # then B alone for 1 s
    assert a_end - a == pytest.approx(1.5)
    assert b_end - b == pytest.approx(1.5)
    # Together they account for exactly the 3 s the replica was busy.
    assert (a_end - a) + (b_end - b) == pytest.approx(3.0)
    idle = r.share_now(10.0)
    assert idle == b_end  # an idle replica's clock does not move


def test_pools_carry_cost_rules_and_a_price_table() -> None:
    doc = """
    [[pools]]
    name = "gpu"
    models = ["m"]
    endpoints = ["http://a:1/v1"]
    gpus_per_replica = 2
    cost_rule = "max"
    gpu_hour_usd = 2.5
    [prices.m]
    prompt_per_mtok = 0.5
    completion_per_mtok = 1.5
    """
    config = parse_pools(doc, "toml")
    pool = config.pool("gpu")
    assert pool is not None and pool.cost_rule is CostRule.max
    assert pool.gpu_hour_usd == Decimal("2.5") and pool.gpus_per_replica == 2
    assert config.prices["m"].completion_per_mtok == Decimal("1.5")
    # Pricing, built from the configuration, charges by the pool's rule; a request that
    # reached no pool (or an unknown one) at the token prices.
    pricing = Pricing.of(config)
    tokens = token_cost(config.prices["m"], 1000, 1000)
    assert pricing.cost(None, "m", prompt=1000, completion=1000) == tokens
    assert pricing.cost("gone", "m", prompt=1000, completion=1000, gpu_seconds=3600) == tokens
    assert pricing.cost("gpu", "m", prompt=1000, completion=1000,
                        gpu_seconds=3600) == Decimal("2.5")
    alone = Pricing.of(None, config.prices)
    assert alone.prices == config.prices and not alone.rules


@pytest.mark.parametrize(("extra", "message"), [
    ('cost_rule = "gpu_time"', "sets no gpu_hour_usd"),
    ('cost_rule = "max"\ngpu_hour_usd = 2\ngpus_per_replica = 0', "has no GPUs"),
    ('[prices.other]\nprompt_per_mtok = 1', "no price for m"),
    ('[prices.m]\nprompt_per_mtok = -1', "greater than or equal to 0"),
])
def test_bad_cost_configuration_is_refused_with_a_reason(extra: str, message: str) -> None:
    doc = f'[[pools]]\nname = "p"\nmodels = ["m"]\nendpoints = ["http://a:1/v1"]\n{extra}\n'
    with pytest.raises(PoolsConfigError, match=message):
        parse_pools(doc, "toml")


def test_prices_from_the_environment_complete_a_single_server_setup() -> None:
    prices = json.dumps({"smollm2": {"prompt_per_mtok": 0.1, "completion_per_mtok": 0.2}})
    config = load_pools(None, None, "http://h:1/v1", ["smollm2"], 8, prices)
    assert config is not None and config.prices["smollm2"].prompt_per_mtok == Decimal("0.1")
    with pytest.raises(PoolsConfigError, match="DISPATCH_PRICES"):
        load_pools(None, None, "http://h:1/v1", ["smollm2"], 8, "[1, 2]")
    with pytest.raises(PoolsConfigError, match="DISPATCH_PRICES"):
        load_pools(None, None, "http://h:1/v1", ["smollm2"], 8, "{not json")


def samples(metrics: ServiceMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metric_labels_stay_bounded() -> None:
    metrics = ServiceMetrics(max_tenants=2, known_models=lambda: ["m"])
    for tenant in ("a", "b", "c", "d", "a"):
        metrics.observe_chat(tenant, "m", "ok", prompt=10, completion=2, cached=0,
                             duration_s=0.2, ttft_s=0.05, gpu_seconds=0.1, cost_usd=0.001)
    metrics.observe_chat("a", "made-up-model", "upstream_error", prompt=0, completion=0,
                         cached=0, duration_s=0.1, ttft_s=None, gpu_seconds=None,
                         cost_usd=0)
    metrics.rejected("e", "rate_limited")
    requests = samples(metrics, "tenantrag_chat_requests_total")
    assert requests == {
        (("model", "m"), ("status", "ok"), ("tenant", "a")): 2.0,
        (("model", "m"), ("status", "ok"), ("tenant", "b")): 1.0,
        (("model", "m"), ("status", "ok"), ("tenant", "other")): 2.0,
        (("model", "other"), ("status", "upstream_error"), ("tenant", "a")): 1.0,
    }
    assert samples(metrics, "tenantrag_rejections_total") == {
        (("reason", "rate_limited"), ("tenant", "other")): 1.0}
    tokens = samples(metrics, "tenantrag_tokens_total")
    assert tokens[(("model", "m"), ("tenant", "a"), ("type", "prompt"))] == 20.0

