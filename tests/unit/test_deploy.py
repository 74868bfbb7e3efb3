"""The container image and the compose stack (docker/): what an operator relies on when
they run ``docker compose -f docker/compose.yaml up``. No Docker engine runs here, so the
compose file is rendered and checked with ``docker-compose config``."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from app.inference.pools import parse_pools
from app.server.cli import cli
from app.settings import Settings
from tests.tools import required_tool, unread_variables

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
SECRETS = {
    "POSTGRES_PASSWORD": "pg-test-password",
    "DATABASE_APP_PASSWORD": "app-test-password",
    "QDRANT_API_KEY": "qdrant-test-key",
    "VLLM_API_KEY": "vllm-test-key",
    "AUTH_KEY_PEPPER": "p" * 40,
    "AUTH_PLATFORM_ADMIN_KEY": "k" * 40,
}
APP_SERVICES = ("api", "worker", "migrate")
BACKING_SERVICES = ("postgres", "redis", "qdrant")


def compose_config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` with only ``env`` set (an empty env file, so a developer's
    docker/.env does not leak in)."""
    tool = required_tool("docker-compose", "apt-get install docker-compose")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    return subprocess.run(
        [tool, "-f", str(COMPOSE), "--env-file", str(empty), "config"],
        env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The rendered compose file, with test secrets."""
    result = compose_config(tmp_path_factory.mktemp("compose"), SECRETS)
    assert result.returncode == 0, result.stderr
    rendered: dict[str, Any] = yaml.safe_load(result.stdout)
    return rendered


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rendered services by name."""
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    pairs = [line.split(maxsplit=1) for line in lines if line and not line.startswith("#")]
    return [(p[0].upper(), p[1] if len(p) > 1 else "") for p in pairs]


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the Dockerfile's last stage (what the image runs)."""
    instructions = dockerfile_instructions()
    starts = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    return instructions[starts[-1]:]


# --- the image ------------------------------------------------------------------------


def test_image_is_multi_stage_and_the_final_stage_only_copies_the_built_venv() -> None:
    froms = [args for op, args in dockerfile_instructions() if op == "FROM"]
    assert len(froms) >= 2
    final = final_stage()
    copies = [args for op, args in final if op == "COPY"]
    assert copies and all(c.startswith("--from=build ") for c in copies)
    # No compiler in what runs: build tools are installed in the build stage only.
    assert not any("build-essential" in args for op, args in final if op == "RUN")


def test_image_runs_as_an_unprivileged_numeric_user() -> None:
    users = [args for op, args in final_stage() if op == "USER"]
    assert users, "the final stage sets no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0  # numeric: Kubernetes' runAsNonRoot can check it


def test_image_installs_torch_cpu_before_the_pinned_lock_and_loads_the_model_offline() -> None:
    runs = [args for op, args in dockerfile_instructions() if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if '"$TORCH"' in r and "--no-deps" in r)
    lock_at = next(i for i, r in enumerate(runs) if "-c requirements.lock" in r)
    assert torch_at < lock_at
    args = dict(a.split("=", 1) for op, a in dockerfile_instructions() if op == "ARG" and "=" in a)
    assert args["TORCH"] == "torch==2.13.0"
    assert args["TORCH_INDEX_URL"].endswith("/cpu")
    assert any("HF_HUB_OFFLINE=1" in r and "load_models" in r for r in runs)
    env = " ".join(args for op, args in final_stage() if op == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "APP_HOST=0.0.0.0" in env


def test_image_checks_healthz_and_runs_every_cli_command_compose_uses(
    compose: dict[str, Any],
) -> None:
    final = dict(final_stage())
    assert "/healthz" in final["HEALTHCHECK"]
    assert final["ENTRYPOINT"] == '["tenantrag"]'
    commands = set(typer.main.get_command(cli).commands)  # type: ignore[attr-defined]
    for name in APP_SERVICES:
        assert services(compose)[name]["command"][0] in commands


def test_build_context_leaves_out_local_state() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".data", ".cache", "docker/.env"} <= ignored


# --- the compose stack ----------------------------------------------------------------


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    result = compose_config(tmp_path, {k: v for k, v in SECRETS.items()
                                       if k != "POSTGRES_PASSWORD"})
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in docker/.env" in result.stderr
    example = (DOCKER / ".env.example").read_text()
    for name in SECRETS:
        assert re.search(rf"^{name}=$", example, re.M), f"{name} missing from .env.example"


def test_compose_runs_every_service_from_official_images(compose: dict[str, Any]) -> None:
    found = services(compose)
    assert set(found) == {*APP_SERVICES, *BACKING_SERVICES, "vllm"}
    for name in APP_SERVICES:
        assert found[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert found[name]["image"] == found["api"]["image"]  # one image, three commands
    assert found["qdrant"]["image"].startswith("qdrant/qdrant:")
    assert found["vllm"]["image"].startswith("vllm/vllm-openai:")
    assert found["postgres"]["image"].startswith("postgres:")
    assert found["redis"]["image"].startswith("redis:")
    assert found["api"]["ports"][0]["target"] == 8000


def test_app_services_wait_for_healthy_backends_and_a_finished_migration(
    compose: dict[str, Any],
) -> None:
    found = services(compose)
    for name in ("api", "worker"):
        needs = found[name]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully"
        for backend in BACKING_SERVICES:
            assert needs[backend]["condition"] == "service_healthy"
    assert found["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert found["migrate"]["restart"] == "no"


def test_every_long_running_service_has_a_health_check(compose: dict[str, Any]) -> None:
    found = services(compose)
    for name in ("api", "vllm", *BACKING_SERVICES):
        test = found[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
    assert "/readyz" in " ".join(found["api"]["healthcheck"]["test"])
    assert "/health" in " ".join(found["vllm"]["healthcheck"]["test"])
    # The worker and the one-shot migration serve no HTTP: the image's check is off.
    assert found["worker"]["healthcheck"]["test"] == ["NONE"]


def test_state_lives_in_named_volumes_and_redis_keeps_an_append_only_file(
    compose: dict[str, Any],
) -> None:
    found = services(compose)
    mounts = {"postgres": "/var/lib/postgresql/data", "redis": "/data",
              "qdrant": "/qdrant/storage"}
    for name, target in mounts.items():
        volumes = [v.split(":") for v in found[name]["volumes"]]
        assert any(v[1] == target and v[0] in compose["volumes"] for v in volumes), name
    command = found["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_the_vllm_pool_reserves_a_gpu(compose: dict[str, Any]) -> None:
    devices = services(compose)["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_app_services_point_at_the_compose_backends(compose: dict[str, Any]) -> None:
    env = services(compose)["api"]["environment"]
    assert env["QDRANT_URL"] == "http://qdrant:6333"
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert urlsplit(env["DATABASE_APP_URL"]).hostname == "postgres"
    assert env["QDRANT_API_KEY"] == services(compose)["qdrant"]["environment"][
        "QDRANT__SERVICE__API_KEY"]
    assert services(compose)["worker"]["environment"] == env


def test_only_the_migration_gets_the_owner_role(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = services(compose)
    owner = urlsplit(found["migrate"]["environment"]["DATABASE_URL"])
    assert owner.username == found["postgres"]["environment"]["POSTGRES_USER"]
    assert owner.password == SECRETS["POSTGRES_PASSWORD"]
    for name in ("api", "worker"):
        env = found[name]["environment"]
        assert "DATABASE_URL" not in env, f"{name} gets the owner's URL"
        assert not any(SECRETS["POSTGRES_PASSWORD"] in value for value in env.values()), name
        app = urlsplit(env["DATABASE_APP_URL"])
        assert (app.username, app.password) == ("tenantrag_app",
                                                SECRETS["DATABASE_APP_PASSWORD"])
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        monkeypatch.delenv("DATABASE_URL", raising=False)
        settings = Settings()  # production settings validate with the app URL alone
        assert urlsplit(settings.database.application_url()).username == "tenantrag_app"
    # The migration needs nothing but the owner's URL and the app role's password.
    assert set(found["migrate"]["environment"]) == {"APP_ENV", "DATABASE_URL",
                                                    "DATABASE_APP_PASSWORD"}


def test_every_variable_compose_sets_is_one_the_app_reads(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = services(compose)["api"]["environment"]
    pools = parse_pools((DOCKER / "pools.toml").read_text(), "toml")
    unknown = unread_variables(set(env), pools)
    assert not unknown, f"compose sets variables the app does not read: {unknown}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # production: refuses missing or default secrets
    assert settings.is_production
    assert settings.qdrant.url == "http://qdrant:6333"
    assert str(settings.dispatch.pools_file) == env["DISPATCH_POOLS_FILE"]
    assert settings.server.effective_log_format() == "json"
    assert not settings.tracing.exporter_otlp_endpoint  # off unless the operator sets it


def test_the_pools_file_parses_and_routes_to_the_compose_vllm_service(
    compose: dict[str, Any],
) -> None:
    found = services(compose)
    pools = parse_pools((DOCKER / "pools.toml").read_text(), "toml")
    mount = next(v for v in found["api"]["volumes"] if v.split(":")[0].endswith("pools.toml"))
    assert mount.split(":")[1] == found["api"]["environment"]["DISPATCH_POOLS_FILE"]
    vllm_args = found["vllm"]["command"]
    served = vllm_args[vllm_args.index("--served-model-name") + 1]
    for pool in pools.pools:
        assert served in pool.models
        for endpoint in pool.endpoints:
            url = urlsplit(endpoint)
            assert url.hostname in found and url.port == 8000, endpoint
        if pool.api_key_env:
            assert pool.api_key_env in found["api"]["environment"]
            assert pool.api_key_env in found["vllm"]["environment"]
