"""Added latency and maximum throughput of this app's chat path vs the LiteLLM proxy,
in front of the same fake OpenAI-compatible upstream, in one run on one machine.

    .venv/bin/python bench/dispatch_overhead.py [--rps 100] [--seconds 10]
        [--concurrency 32] [--litellm .cache/litellm-venv/bin/litellm]
        [--no-litestar-route]

Targets, each its own process, one worker each:
  (a) direct: the fake upstream itself (``python -m tests.fake_openai``, no latency);
  (b) app: ``tenantrag serve`` with a tenant key, the fake as its only pool
      (``LLM_BASE_URL``), retrieval off, ``store`` off, on PostgreSQL and Redis
      (DATABASE_URL/REDIS_URL, else the embedded stack) in a scratch database; the
      tenant has (high) rate limits, concurrency limit and budget, so each request runs
      the Redis admission script and writes its usage event;
  (b') app-litestar: the same app with ``APP_FAST_CHAT=false``, so Litestar's own
      route (its middleware, guards, signature model and dependency injection) serves
      chat instead of the fast door (app/server/fast_chat.py); same database and key;
      ``--no-litestar-route`` leaves it out;
  (c) litellm: ``litellm --config`` with the same model at the fake, master key, no
      database (its Prisma engine needs a download this machine cannot make).

For each: non-streaming chat requests at a fixed ``--rps`` (open loop, ``--seconds``)
for latency p50/p99, then a closed loop of ``--concurrency`` clients for the maximum
requests per second. Added latency = target's percentile - direct's percentile. The load
generator shares the machine's cores with the target, which caps every maximum alike.
Install LiteLLM with ``python -m venv .cache/litellm-venv &&
.cache/litellm-venv/bin/pip install 'litellm[proxy]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import uvloop
from ingest_throughput import backing_services, scratch_db

from app.settings import DatabaseSettings, as_asyncpg_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fake upstream lives with the tests
from tests.fake_openai import free_port  # noqa: E402

MODEL = "smollm2"
ADMIN_KEY = "bench-platform-admin-key-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "Where is the travel policy?"}]


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,  # noqa: S603
                            start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited; see {log}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up; see {log}")


async def one(client: aiohttp.ClientSession, url: str, headers: dict[str, str],
              body: bytes) -> float:
    started = time.perf_counter()
    async with client.post(url, data=body, headers=headers) as resp:
        await resp.read()
        elapsed = time.perf_counter() - started
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {(await resp.text())[:300]}")
    return elapsed


def session(connections: int, headers: dict[str, str]) -> aiohttp.ClientSession:
    """The load generator's client: aiohttp (about a third of httpx's CPU per request,
    so the generator takes less of the cores it shares with the targets)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=30),
        headers={**headers, "Content-Type": "application/json"})


async def fixed_rate(url: str, headers: dict[str, str], body: dict[str, Any], rps: float,
                     seconds: float) -> list[float]:
    """Open loop: send at ``rps`` regardless of answers; latencies in seconds."""
    raw = json.dumps(body).encode()
    async with session(500, headers) as client:
        for _ in range(20):  # warm connections and caches
            await one(client, url, {}, raw)
        tasks = []
        start = time.perf_counter()
        n = int(rps * seconds)
        for i in range(n):
            delay = start + i / rps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, url, {}, raw)))
        return list(await asyncio.gather(*tasks))


async def max_rate(url: str, headers: dict[str, str], body: dict[str, Any],
                   concurrency: int, seconds: float) -> float:
    """Closed loop: ``concurrency`` clients back to back; completed requests per second."""
    raw = json.dumps(body).encode()
    done = 0
    async with session(concurrency, headers) as client:
        for _ in range(20):
            await one(client, url, {}, raw)
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await one(client, url, {}, raw)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1]


async def app_key(base: str) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=base, headers=admin, timeout=30) as c:
        # Limits set (high), so every request runs the admission script and is metered.
        tenant = await c.post("/admin/tenants", json={
            "slug": "bench", "name": "Bench", "tier": "enterprise", "rpm_limit": 10**7,
            "tpm_limit": 10**9, "max_concurrency": 10**4,
            "monthly_token_budget": 10**13})
        tenant.raise_for_status()
        key = await c.post(f"/admin/tenants/{tenant.json()['id']}/keys",
                           json={"name": "bench", "scopes": ["chat"]})
        key.raise_for_status()
        return str(key.json()["key"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rps", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--litellm", default=str(ROOT / ".cache/litellm-venv/bin/litellm"))
    parser.add_argument("--profile-app", help="write a py-spy profile of the app here")
    parser.add_argument("--no-litestar-route", dest="litestar_route", action="store_false",
                        help="leave out the app with Litestar's own chat route")
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    with backing_services("bench-dispatch-") as (work, db_url, redis_url):
        try:
            measure(args, work, db_url, redis_url, procs)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGINT)
            for proc in procs:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()


def measure(args: argparse.Namespace, work: Path, db_url: str, redis_url: str,
            procs: list[subprocess.Popen[bytes]]) -> None:
    """Start the targets (into ``procs``) and measure each."""
    db = asyncio.run(scratch_db(as_asyncpg_url(db_url)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    fake_port = free_port()
    procs.append(spawn([sys.executable, "-m", "tests.fake_openai", "--port",
                        str(fake_port)], env, work / "fake.log"))
    fake = f"http://127.0.0.1:{fake_port}"
    wait_http(f"{fake}/health", procs[-1], work / "fake.log")

    app_port = free_port()
    app_env = {**env, "APP_ENV": "dev", "DATABASE_URL": db, "REDIS_URL": redis_url,
               "AUTH_PLATFORM_ADMIN_KEY": ADMIN_KEY, "LLM_BASE_URL": f"{fake}/v1",
               "DISPATCH_MAX_IN_FLIGHT": "1000", "APP_DATA_DIR": str(work / "data"),
               "HF_HUB_OFFLINE": "1"}
    from app.db.migrate import migrate
    asyncio.run(migrate(DatabaseSettings(url=db)))
    tenantrag = str(Path(sys.executable).parent / "tenantrag")
    serve = [tenantrag, "serve", "--port", str(app_port)]
    if args.profile_app:  # developer aid: needs `pip install py-spy`
        serve = [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw",
                 "-o", args.profile_app, "--", *serve]
    procs.append(spawn(serve, app_env, work / "app.log"))
    app = f"http://127.0.0.1:{app_port}"
    wait_http(f"{app}/healthz", procs[-1], work / "app.log")
    key = asyncio.run(app_key(app))
    app_body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "store": False,
                "retrieval": {"enabled": False}}

    targets: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {
        "direct": (f"{fake}/v1/chat/completions", {},
                   {"model": MODEL, "messages": MESSAGES, "max_tokens": 8}),
        "app": (f"{app}/v1/chat/completions", {"Authorization": f"Bearer {key}"}, app_body),
    }
    if args.litestar_route:  # the same app and tenant, chat by Litestar's own route
        route_port = free_port()
        procs.append(spawn([tenantrag, "serve", "--port", str(route_port)],
                           {**app_env, "APP_FAST_CHAT": "false",  # its own shard folder
                            "APP_DATA_DIR": str(work / "data-litestar")},
                           work / "app-litestar.log"))
        route = f"http://127.0.0.1:{route_port}"
        wait_http(f"{route}/healthz", procs[-1], work / "app-litestar.log")
        targets["app-litestar"] = (f"{route}/v1/chat/completions",
                                   {"Authorization": f"Bearer {key}"}, app_body)
    litellm = Path(args.litellm)
    if litellm.exists():
        lite_port = free_port()
        config = work / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL}\n"
            f"      api_base: {fake}/v1\n"
            "      api_key: none\n"
            "general_settings:\n"
            "  master_key: sk-bench-master\n"
            "litellm_settings:\n"
            "  telemetry: false\n")
        lite_env = {k: v for k, v in env.items() if k not in ("DATABASE_URL",)}
        procs.append(spawn([str(litellm), "--config", str(config), "--port",
                            str(lite_port), "--num_workers", "1"], lite_env,
                           work / "litellm.log"))
        wait_http(f"http://127.0.0.1:{lite_port}/health/liveliness", procs[-1],
                  work / "litellm.log")
        targets["litellm"] = (f"http://127.0.0.1:{lite_port}/v1/chat/completions",
                              {"Authorization": "Bearer sk-bench-master"},
                              {"model": MODEL, "messages": MESSAGES, "max_tokens": 8})
    else:
        print(f"LiteLLM not found at {litellm}: skipped", file=sys.stderr)

    results: dict[str, dict[str, float]] = {}
    for name, (url, headers, body) in targets.items():
        try:
            lat = uvloop.run(fixed_rate(url, headers, body, args.rps, args.seconds))
            rps = uvloop.run(max_rate(url, headers, body, args.concurrency, args.seconds))
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
            if name != "litellm":
                raise
            # LiteLLM sometimes drops connections under this load: say so, keep ours.
            print(f"litellm  failed under load: {type(exc).__name__}: {exc}", flush=True)
            continue
        results[name] = {"p50": pct(lat, 0.5) * 1000, "p99": pct(lat, 0.99) * 1000,
                         "max_rps": rps}
        print(f"{name:12s} p50 {results[name]['p50']:7.2f} ms  p99 "
              f"{results[name]['p99']:7.2f} ms  max {rps:7.0f} req/s", flush=True)
    base = results["direct"]
    print(f"\nadded latency at {args.rps:g} RPS over direct:")
    for name in ("app", "app-litestar", "litellm"):
        if name in results:
            r = results[name]
            print(f"  {name:12s} p50 +{r['p50'] - base['p50']:.2f} ms  p99 "
                  f"+{r['p99'] - base['p99']:.2f} ms  max {r['max_rps']:.0f} req/s")
    if "litellm" in results:
        for name in ("app", "app-litestar"):
            if name in results:
                print(f"{name} max RPS / LiteLLM max RPS: "
                      f"{results[name]['max_rps'] / results['litellm']['max_rps']:.2f}x")


if __name__ == "__main__":
    main()
