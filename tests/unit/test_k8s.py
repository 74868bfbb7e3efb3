"""The Kubernetes manifests (deploy/k8s): valid against the Kubernetes API schemas, offline
(kubernetes-validate ships them), and wired the way the app needs: the pools file names
replicas that exist, the dedicated pool's GPUs fit its namespace's quota, probes hit the
app's health routes."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr, ValidationError

from app.inference.pools import PoolKind, PoolsConfig, parse_pools
from app.settings import AuthSettings, ServerSettings, Settings
from tests.tools import required_tool, unread_variables

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUSTOMIZATIONS = ("base", "tenants/acme", "overlays/example")
# The oldest Kubernetes these manifests claim to support, and the newest schemas shipped.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
GPU = "nvidia.com/gpu"
Doc = dict[str, Any]


def manifest_files() -> Iterator[Path]:
    """Every manifest file (kustomization files are kustomize's, not the API's)."""
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            yield path


def render(kustomization: str) -> list[Doc]:
    """``kubectl kustomize`` of one folder: the objects it would apply."""
    kubectl = required_tool("kubectl", "it ships kustomize; apt-get install kubectl")
    result = subprocess.run([kubectl, "kustomize", str(K8S / kustomization)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def example() -> list[Doc]:
    """The rendered example deployment (platform + a dedicated tenant pool)."""
    return render("overlays/example")


def find(docs: list[Doc], kind: str, name: str, namespace: str | None = None) -> Doc:
    """The one object of that kind and name (name prefix for generated ConfigMaps)."""
    found = [d for d in docs if d["kind"] == kind
             and (d["metadata"]["name"] == name or d["metadata"]["name"].startswith(f"{name}-"))
             and namespace in (None, d["metadata"].get("namespace"))]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def container(workload: Doc) -> Doc:
    """The first container of a workload's pod template."""
    first: Doc = workload["spec"]["template"]["spec"]["containers"][0]
    return first


def validate(doc: Doc, where: str) -> None:
    """Fail with the schema error and where it is; strict: unknown fields are errors."""
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where}: {doc['kind']} {doc['metadata'].get('name')} is invalid "
                        f"for Kubernetes {version} at {path}: {exc.message}")


def test_every_manifest_file_is_valid_against_the_kubernetes_schemas() -> None:
    files = list(manifest_files())
    assert len(files) >= 9
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            validate(doc, str(path.relative_to(K8S)))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_each_kustomization_renders_valid_objects(kustomization: str) -> None:
    docs = render(kustomization)
    assert docs
    for doc in docs:
        validate(doc, kustomization)


def test_api_scales_out_and_is_probed_on_the_health_routes(example: list[Doc]) -> None:
    api = find(example, "Deployment", "tenantrag-api", "tenantrag")
    c = container(api)
    assert c["args"] == ["serve"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    hpa = find(example, "HorizontalPodAutoscaler", "tenantrag-api", "tenantrag")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "tenantrag-api"}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert "resources" in c and c["resources"]["requests"]["cpu"]  # HPA needs CPU requests
    service = find(example, "Service", "tenantrag-api", "tenantrag")
    assert service["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]


def test_app_pods_run_as_the_image_user_with_a_read_only_root(example: list[Doc]) -> None:
    for kind, name, command in (("Deployment", "tenantrag-api", "serve"),
                                ("Deployment", "tenantrag-worker", "worker"),
                                ("Job", "tenantrag-migrate", "migrate")):
        workload = find(example, kind, name, "tenantrag")
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # USER in docker/Dockerfile
        c = container(workload)
        assert c["args"] == [command]
        assert c["image"] == "registry.example.com/tenantrag:0.1.0"
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts  # noqa: S108 (an emptyDir: the image keeps its caches there)


def namespace_of(endpoint: str) -> str:
    """The namespace in a replica's cluster DNS name."""
    host = urlsplit(endpoint).hostname
    assert host is not None
    return host.split(".")[2]


def pools_of(docs: list[Doc]) -> tuple[PoolsConfig, str]:
    """The pools document the API reads, and the path it reads it at."""
    api = find(docs, "Deployment", "tenantrag-api", "tenantrag")
    config = find(docs, "ConfigMap", "tenantrag-config", "tenantrag")["data"]
    pools_map = find(docs, "ConfigMap", "tenantrag-pools", "tenantrag")
    volume = next(v for v in api["spec"]["template"]["spec"]["volumes"]
                  if v.get("configMap", {}).get("name") == pools_map["metadata"]["name"])
    mount = next(m for m in container(api)["volumeMounts"] if m["name"] == volume["name"])
    [(filename, text)] = pools_map["data"].items()
    assert config["DISPATCH_POOLS_FILE"] == f"{mount['mountPath']}/{filename}"
    return parse_pools(text, "toml"), config["DISPATCH_POOLS_FILE"]


@pytest.mark.parametrize("kustomization", ["base", "overlays/example"])
def test_pool_endpoints_are_replicas_serving_the_pool_models(kustomization: str) -> None:
    docs = render(kustomization)
    pools, _ = pools_of(docs)
    for pool in pools.pools:
        for endpoint in pool.endpoints:
            url = urlsplit(endpoint)
            assert url.hostname is not None
            # <statefulset>-<ordinal>.<headless service>.<namespace>.svc.cluster.local
            pod, service_name, namespace, *_ = url.hostname.split(".")
            workload, _, ordinal = pod.rpartition("-")
            service = find(docs, "Service", service_name, namespace)
            assert service["spec"]["clusterIP"] == "None", "a replica needs a stable name"
            assert url.port in [p["port"] for p in service["spec"]["ports"]]
            sts = find(docs, "StatefulSet", workload, namespace)
            assert sts["spec"]["serviceName"] == service_name
            assert int(ordinal) < sts["spec"]["replicas"], f"{endpoint}: no such replica"
            args = container(sts)["args"]
            assert args[args.index("--served-model-name") + 1] in pool.models
            assert args[args.index("--port") + 1] == str(url.port)


def test_every_pool_key_reaches_the_api_and_its_vllm_server(example: list[Doc]) -> None:
    pools, _ = pools_of(example)
    api = find(example, "Deployment", "tenantrag-api", "tenantrag")
    secret_refs = [e["secretRef"]["name"] for e in container(api)["envFrom"] if "secretRef" in e]
    api_secret = find(example, "Secret", secret_refs[0], "tenantrag")["stringData"]
    for pool in pools.pools:
        assert pool.api_key_env in api_secret, f"the API cannot read {pool.api_key_env}"
        namespace = namespace_of(pool.endpoints[0])
        server = find(example, "StatefulSet", f"vllm-{pool.name}", namespace)
        [env] = [e for e in container(server)["env"] if e["name"] == "VLLM_API_KEY"]
        ref = env["valueFrom"]["secretKeyRef"]
        server_key = find(example, "Secret", ref["name"], namespace)["stringData"][ref["key"]]
        assert server_key == api_secret[pool.api_key_env], f"pool {pool.name}: keys differ"


def test_the_dedicated_pool_runs_in_the_tenant_namespace_within_its_gpu_quota(
    example: list[Doc],
) -> None:
    pools, _ = pools_of(example)
    [dedicated] = [p for p in pools.pools if p.kind is PoolKind.dedicated]
    namespace = namespace_of(dedicated.endpoints[0])
    assert namespace != "tenantrag" and dedicated.tenants == ["acme"]
    quota = find(example, "ResourceQuota", "tenant-gpus", namespace)
    allowed = int(quota["spec"]["hard"][f"requests.{GPU}"])
    used = 0
    for sts in (d for d in example if d["kind"] == "StatefulSet"
                and d["metadata"]["namespace"] == namespace):
        resources = container(sts)["resources"]
        assert resources["limits"][GPU] == resources["requests"][GPU]
        used += sts["spec"]["replicas"] * int(resources["requests"][GPU])
    assert 0 < used <= allowed
    policy = find(example, "NetworkPolicy", "vllm-from-tenantrag-api", namespace)
    [rule] = policy["spec"]["ingress"]
    [source] = rule["from"]
    assert source["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "tenantrag"}


def test_the_shared_pool_requests_gpus(example: list[Doc]) -> None:
    sts = find(example, "StatefulSet", "vllm-shared", "tenantrag")
    assert int(container(sts)["resources"]["limits"][GPU]) >= 1
    claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert claim in [m["name"] for m in container(sts)["volumeMounts"]]  # model cache kept


def test_every_variable_the_app_pods_get_is_one_the_app_reads(example: list[Doc]) -> None:
    pools, _ = pools_of(example)
    config = find(example, "ConfigMap", "tenantrag-config", "tenantrag")["data"]
    secret = find(example, "Secret", "tenantrag-secrets", "tenantrag")["stringData"]
    assert not unread_variables(set(config), pools)
    assert not unread_variables(set(secret), pools)
    assert config["APP_ENV"] == "prod" and config["QDRANT_URL"].startswith("http")


def secrets_read_by(docs: list[Doc], workload: Doc) -> dict[str, str]:
    """Every secret variable a workload's first container gets (envFrom and env)."""
    found: dict[str, str] = {}
    namespace = workload["metadata"].get("namespace")
    for source in container(workload).get("envFrom", []):
        if "secretRef" in source:
            found |= find(docs, "Secret", source["secretRef"]["name"], namespace)["stringData"]
    for env in container(workload).get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            found[env["name"]] = find(docs, "Secret", ref["name"], namespace)["stringData"][
                ref["key"]]
    return found


def test_only_the_migration_gets_the_owner_role(example: list[Doc]) -> None:
    migration = secrets_read_by(example, find(example, "Job", "tenantrag-migrate", "tenantrag"))
    owner = urlsplit(migration["DATABASE_URL"]).password
    assert owner and set(migration) == {"DATABASE_URL", "DATABASE_APP_PASSWORD"}
    for name in ("tenantrag-api", "tenantrag-worker"):
        got = secrets_read_by(example, find(example, "Deployment", name, "tenantrag"))
        assert "DATABASE_URL" not in got and "DATABASE_APP_PASSWORD" not in got, name
        assert not any(owner in value for value in got.values()), name
        app = urlsplit(got["DATABASE_APP_URL"])
        assert (app.username, app.password) == ("tenantrag_app",
                                                migration["DATABASE_APP_PASSWORD"]), name


def test_the_example_secrets_are_refused_by_the_app_in_production(example: list[Doc]) -> None:
    secret = find(example, "Secret", "tenantrag-secrets", "tenantrag")["stringData"]
    assert all("EXAMPLE" in value for value in secret.values())
    with pytest.raises(ValidationError, match="AUTH_KEY_PEPPER must be at least 32"):
        Settings(server=ServerSettings(env="prod"), auth=AuthSettings(
            key_pepper=SecretStr(secret["AUTH_KEY_PEPPER"]),
            platform_admin_key=SecretStr(secret["AUTH_PLATFORM_ADMIN_KEY"])))
