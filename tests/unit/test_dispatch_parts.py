"""The dispatcher's parts on their own: the fair queue, replica choice, the circuit
breaker, vLLM's /metrics, and the pools file."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import pytest

from app.db.models import Tier
from app.inference.fairqueue import DeficitRoundRobin, Entry
from app.inference.pools import PoolKind, PoolsConfigError, load_pools, parse_pools
from app.inference.replica import CircuitBreaker, Replica, choose
from app.inference.upstream import HttpClient, Upstream
from app.settings import LlmSettings

# --- weighted deficit round robin ---------------------------------------------------------


def drain(queue: DeficitRoundRobin[int], n: int) -> list[str]:
    served = []
    for _ in range(n):
        entry = queue.pop()
        assert entry is not None
        served.append(str(entry.key))
    return served


def test_equal_weights_alternate_even_when_one_tenant_queued_far_more() -> None:
    q: DeficitRoundRobin[int] = DeficitRoundRobin(quantum=100)
    for i in range(50):
        q.push(Entry("noisy", 1.0, 100, i))
    for i in range(3):
        q.push(Entry("quiet", 1.0, 100, i))
    served = drain(q, 6)
    assert served.count("quiet") == 3  # within the first 6, not after the 50
    assert len(q) == 47


def test_a_tenant_with_nothing_waiting_is_served_at_the_next_slot() -> None:
    q: DeficitRoundRobin[int] = DeficitRoundRobin(quantum=1000)  # big turns for noisy
    for i in range(50):
        q.push(Entry("noisy", 1.0, 100, i))
    assert drain(q, 1) == ["noisy"]  # noisy is mid-turn with credit for 9 more
    q.push(Entry("quiet", 1.0, 100, 0))
    assert drain(q, 1) == ["quiet"]
    # A sparse tenant that keeps a backlog pays its debt: no more than its share.
    for i in range(1, 30):
        q.push(Entry("quiet", 1.0, 100, i))
    counts = collections.Counter(drain(q, 40))
    assert counts["quiet"] <= 21


def test_ineligible_tenants_are_skipped_but_keep_their_place() -> None:
    q: DeficitRoundRobin[int] = DeficitRoundRobin(quantum=100)
    for i in range(3):
        q.push(Entry("a", 1.0, 100, i))
        q.push(Entry("b", 1.0, 100, i))
    only_b = q.pop(lambda key: key == "b")
    assert only_b is not None and only_b.key == "b"
    assert q.pop(lambda key: False) is None
    assert q.depth("a") == 3  # nothing of a's was lost while it was skipped
    assert sorted(drain(q, 5)) == ["a", "a", "a", "b", "b"]


def test_weights_share_slots_in_proportion() -> None:
    q: DeficitRoundRobin[int] = DeficitRoundRobin(quantum=100)
    for i in range(400):
        q.push(Entry("pro", 2.0, 100, i))
        q.push(Entry("free", 1.0, 100, i))
    counts = collections.Counter(drain(q, 300))
    assert counts["pro"] == pytest.approx(200, abs=3)
    assert counts["free"] == pytest.approx(100, abs=3)


def test_costs_are_in_tokens_so_big_requests_take_more_turns() -> None:
    q: DeficitRoundRobin[int] = DeficitRoundRobin(quantum=100)
    for i in range(100):
        q.push(Entry("big", 1.0, 1000, i))
        q.push(Entry("small", 1.0, 100, i))
    counts = collections.Counter(drain(q, 44))
    # Equal token shares: ten small requests per big one.
    assert counts["small"] == pytest.approx(40, abs=2)
    assert counts["big"] == pytest.approx(4, abs=1)


def test_removed_entries_are_never_served_and_an_idle_tenant_keeps_no_credit() -> None:
    q: DeficitRoundRobin[int] = DeficitRoundRobin(quantum=100)
    gone = Entry("a", 1.0, 50, 1)
    q.push(gone)
    q.push(Entry("b", 1.0, 50, 2))
    assert q.remove(gone) and not q.remove(gone)
    assert q.depth("a") == 0
    popped = q.pop()
    assert popped is not None and popped.key == "b"
    assert q.pop() is None and len(q) == 0


def test_requests_far_above_the_quantum_are_served_without_spinning() -> None:
    q: DeficitRoundRobin[int] = DeficitRoundRobin(quantum=1)
    q.push(Entry("a", 1.0, 10**9, 1))
    q.push(Entry("b", 1.0, 10**9, 2))
    assert sorted(drain(q, 2)) == ["a", "b"]  # a billion rounds would hang here


# --- replicas -----------------------------------------------------------------------------


def replica(url: str, cap: int = 4, in_flight: int = 0) -> Replica:
    r = Replica(pool="p", url=url, cap=cap, in_flight=in_flight,
                upstream=Upstream(url + "/v1", HttpClient(LlmSettings())),
                breaker=CircuitBreaker(threshold=2, cooldown_s=60))
    return r


def test_a_tenant_sticks_to_one_replica_while_loads_are_close() -> None:
    replicas = [replica(f"http://r{i}") for i in range(4)]
    picks = {choose(replicas, b"tenant-1", headroom=0.25) for _ in range(20)}
    assert len(picks) == 1
    favourite = picks.pop()
    assert favourite is not None
    favourite.in_flight = 1  # within the headroom (a quarter of its cap): still chosen
    assert choose(replicas, b"tenant-1", headroom=0.25) is favourite
    # Different tenants spread over the replicas.
    favourites = {choose(replicas, f"t{i}".encode(), 0.25).url  # type: ignore[union-attr]
                  for i in range(40)}
    assert len(favourites) == 4


def test_a_busier_favourite_loses_to_the_least_loaded_and_full_ones_are_skipped() -> None:
    replicas = [replica(f"http://r{i}") for i in range(3)]
    favourite = choose(replicas, b"tenant", 0.25)
    assert favourite is not None
    favourite.in_flight = 2  # 0.5 of its cap, others 0: beyond the headroom
    second = choose(replicas, b"tenant", 0.25)
    assert second is not None and second is not favourite
    for r in replicas:
        r.in_flight = r.cap
    assert choose(replicas, b"tenant", 0.25) is None


def test_unhealthy_open_and_excluded_replicas_are_not_chosen() -> None:
    a, b, c = replica("http://a"), replica("http://b"), replica("http://c")
    a.healthy = False
    b.breaker.on_failure(time.monotonic())
    assert b.breaker.on_failure(time.monotonic()) and b.breaker.is_open
    assert choose([a, b, c], b"t", 0.25, exclude=frozenset({"http://c"})) is None
    assert choose([a, b, c], b"t", 0.25) is c


def test_breaker_half_opens_after_cooldown_for_one_trial() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown_s=10)
    assert breaker.on_failure(100.0)
    assert not breaker.allows(105.0)
    assert breaker.allows(111.0)
    breaker.on_dispatch(111.0)
    assert not breaker.allows(111.5)  # one trial at a time
    breaker.on_failure(112.0)  # trial failed: open again
    assert not breaker.allows(115.0)
    assert breaker.allows(123.0)
    breaker.on_dispatch(123.0)
    breaker.on_success()
    assert breaker.allows(123.1) and not breaker.is_open


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smollm2"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="smollm2"} 5.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="smollm2"} 0.42
"""


def test_vllm_metrics_inform_load() -> None:
    r = replica("http://a", cap=10, in_flight=2)
    r.read_metrics(VLLM_METRICS)  # lines as vLLM 0.32 writes them
    assert r.waiting == 5.0 and r.kv_cache_usage == pytest.approx(0.42)
    assert r.load() == pytest.approx(0.7)
    r.read_metrics(VLLM_METRICS.replace("0.42", "0.99"))
    assert r.load() == 1.0  # a full KV cache counts as full
    r.read_metrics("garbage {{{")  # unreadable: the last readings stay
    assert r.waiting == 5.0


# --- the pools file -----------------------------------------------------------------------

POOLS_TOML = """
[[pools]]
name = "shared-free"
models = ["smollm2"]
endpoints = ["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"]
tiers = ["free"]
max_in_flight = 16

[[pools]]
name = "acme"
kind = "dedicated"
tenants = ["acme"]
models = ["smollm2", "llama"]
endpoints = ["http://10.0.1.1:8000/v1"]
priority_scheduling = true
region = "eu"
"""


def test_pools_file_in_toml_yaml_and_json(tmp_path: Path) -> None:
    toml = parse_pools(POOLS_TOML, "toml")
    assert [p.name for p in toml.pools] == ["shared-free", "acme"]
    assert toml.pools[0].tiers == [Tier.free] and toml.pools[1].kind is PoolKind.dedicated
    assert toml.models() == ["smollm2", "llama"]
    as_json = json.dumps(toml.model_dump(mode="json"))
    assert parse_pools(as_json, "json") == toml
    yaml_file = tmp_path / "pools.yaml"
    yaml_file.write_text("pools:\n  - name: one\n    models: [m]\n"
                         "    endpoints: ['http://h:1/v1']\n")
    loaded = load_pools(yaml_file, None, None, [], 8)
    assert loaded is not None and loaded.pools[0].max_in_flight == 32
    # Without a file or variable, LLM_BASE_URL is one shared pool; with nothing, none.
    single = load_pools(None, None, "http://h:1/v1", ["smollm2"], 8)
    assert single is not None and single.pools[0].max_in_flight == 8
    assert load_pools(None, None, None, ["smollm2"], 8) is None


@pytest.mark.parametrize(("text", "message"), [
    ('[[pools]]\nname="d"\nkind="dedicated"\nmodels=["m"]\nendpoints=["http://h/v1"]',
     "lists no tenants"),
    ('[[pools]]\nname="s"\ntenants=["x"]\nmodels=["m"]\nendpoints=["http://h/v1"]',
     "make it dedicated"),
    ('[[pools]]\nname="s"\nmodels=["m"]\nendpoints=["ftp://h"]', "endpoints"),
    ('[[pools]]\nname="s"\nmodels=["m"]\nendpoints=["http://h/v1"]\nbogus=1', "bogus"),
    ('[[pools]]\nname="a"\nkind="dedicated"\ntenants=["x"]\nmodels=["m"]\n'
     'endpoints=["http://h/v1"]\n[[pools]]\nname="b"\nkind="dedicated"\ntenants=["x"]\n'
     'models=["m"]\nendpoints=["http://g/v1"]', "two dedicated pools"),
    ("pools = [", "not valid toml"),
])
def test_bad_pools_files_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(PoolsConfigError, match=message):
        parse_pools(text, "toml")


def test_a_missing_pools_file_names_itself(tmp_path: Path) -> None:
    with pytest.raises(PoolsConfigError, match="cannot read the pools file"):
        load_pools(tmp_path / "nope.toml", None, None, [], 8)


def test_the_documented_example_pools_file_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parents[2] / "docs" / "pools.example.toml"
    pools = load_pools(example, None, None, [], 8)
    assert pools is not None and len(pools.pools) == 4
    assert {p.name: p.cost_rule.value for p in pools.pools} == {
        "shared-free": "tokens", "shared-paid": "max", "acme-eu": "gpu_time",
        "shared-eu": "tokens"}
    assert set(pools.prices) >= {m for p in pools.pools for m in p.models}
    monkeypatch.setenv("VLLM_PAID_API_KEY", "secret")
    assert pools.pools[1].api_key() == "secret"
    monkeypatch.delenv("VLLM_PAID_API_KEY")
    with pytest.raises(ValueError, match="VLLM_PAID_API_KEY"):
        pools.pools[1].api_key()
