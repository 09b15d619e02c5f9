"""deploy/: every Kubernetes manifest validates against the Kubernetes JSON schemas (offline, strict: an unknown
field fails), the compose file has the services, dependencies and healthchecks production needs, the container
files reference paths that exist, and every TUNEFORGE_* variable they set is one a settings class reads, so a
renamed setting fails here. No Docker engine or cluster runs in these tests (see deploy/README.md)."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic_settings import BaseSettings

from tuneforge_catalog.main import CatalogSettings
from tuneforge_gateway.main import GatewaySettings
from tuneforge_jobs.main import JobsSettings
from tuneforge_trainer.agent import AgentSettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
# The oldest Kubernetes these manifests claim (grpc probes GA since 1.27) and the newest schemas bundled.
K8S_VERSIONS = ("1.31", kubernetes_validate.latest_version())
SETTINGS: dict[str, type[BaseSettings]] = {
    "catalog": CatalogSettings,
    "jobs": JobsSettings,
    "gateway": GatewaySettings,
    "trainer": AgentSettings,
}
SERVICES = tuple(SETTINGS)


def env_names(settings: type[BaseSettings]) -> set[str]:
    prefix = str(settings.model_config.get("env_prefix", ""))
    return {(prefix + name).upper() for name in settings.model_fields}


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_docs() if doc["kind"] == kind}


def pod_specs() -> dict[str, dict[str, Any]]:
    workloads = {**by_kind("Deployment"), **by_kind("DaemonSet"), **by_kind("Job")}
    return {name: doc["spec"]["template"]["spec"] for name, doc in workloads.items()}


def service_of(image: str) -> str:
    """tuneforge/catalog:0.1.0 -> catalog."""
    match = re.fullmatch(r"tuneforge/(\w+):[\w.]+", image)
    assert match, f"image {image!r} is not tuneforge/<service>:<tag>"
    return match.group(1)


@pytest.mark.parametrize(("file", "doc"), k8s_docs(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_kubernetes_manifest_validates_against_the_schemas(file: str, doc: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_misspelt_field() -> None:
    """So the validation above can fail: strict schemas refuse fields Kubernetes doesn't have."""
    deployment = copy.deepcopy(by_kind("Deployment")["tuneforge-catalog"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest_and_the_four_images() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert {i["name"] for i in kustomization["images"]} == {f"tuneforge/{s}" for s in SERVICES}
    assert {doc["metadata"].get("namespace", kustomization["namespace"]) for _, doc in k8s_docs()} >= {"tuneforge"}


def test_what_production_needs_is_there() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in k8s_docs()}
    for svc in ("catalog", "jobs", "gateway"):
        for kind in ("Deployment", "Service", "PodDisruptionBudget"):
            assert (kind, f"tuneforge-{svc}") in kinds
    assert ("DaemonSet", "tuneforge-trainer") in kinds
    assert ("Job", "tuneforge-migrate") in kinds
    assert ("Ingress", "tuneforge-gateway") in kinds
    assert ("Namespace", "tuneforge") in kinds
    secret = by_kind("Secret")["tuneforge-secrets"]["stringData"]
    assert {
        "TUNEFORGE_CATALOG_DATABASE_URL",
        "TUNEFORGE_JOBS_DATABASE_URL",
        "TUNEFORGE_SERVICE_TOKEN",
        "TUNEFORGE_AGENT_JOIN_TOKENS",
    } <= set(secret)
    assert set(by_kind("Secret")["tuneforge-agent"]["stringData"]) == {"TUNEFORGE_AGENT_JOIN_TOKEN"}


def test_services_are_ready_on_grpc_health_and_the_gateway_on_healthz() -> None:
    for svc, port in (("catalog", 50051), ("jobs", 50052)):
        (container,) = pod_specs()[f"tuneforge-{svc}"]["containers"]
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"] == port
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env[f"TUNEFORGE_{svc.upper()}_GRPC_PORT"] == str(port)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port
    (gateway,) = pod_specs()["tuneforge-gateway"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"]["path"] == "/healthz"


def test_every_pod_runs_as_non_root_with_resource_requests_and_limits() -> None:
    for name, spec in pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert container["resources"]["requests"] and container["resources"]["limits"], (name, container["name"])


def test_trainer_agents_run_on_gpu_nodes_holding_their_gpus() -> None:
    spec = pod_specs()["tuneforge-trainer"]
    assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    expressions = {e["key"]: e["values"] for term in terms for e in term["matchExpressions"]}
    (container,) = spec["containers"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    # The GPUs the agent claims are the node's count, which the affinity pins.
    assert expressions["nvidia.com/gpu.present"] == ["true"] and expressions["nvidia.com/gpu.count"] == [gpus]
    assert container["livenessProbe"]["grpc"]["port"] == 50053


def test_services_pdbs_and_references_point_at_what_exists() -> None:
    deployments = by_kind("Deployment")
    for kind in ("Service", "PodDisruptionBudget"):
        for name, doc in by_kind(kind).items():
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
            assert all(labels.get(k) == v for k, v in selector.items()), (kind, name)
    configmaps, secrets, claims = (
        set(by_kind("ConfigMap")),
        set(by_kind("Secret")),
        set(by_kind("PersistentVolumeClaim")),
    )
    for name, spec in pod_specs().items():
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, name
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, name
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in by_kind("Secret")[ref["name"]]["stringData"], name
    ingress = by_kind("Ingress")["tuneforge-gateway"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] in by_kind("Service")


def test_every_tuneforge_variable_in_the_manifests_is_a_setting_its_service_reads() -> None:
    shared: dict[str, set[str]] = {}  # ConfigMap/Secret key -> the services that load it
    bundles = {**by_kind("ConfigMap"), **by_kind("Secret")}
    for name, spec in pod_specs().items():
        for container in spec.get("initContainers", []) + spec["containers"]:
            svc = service_of(container["image"])
            for env in container.get("env", []):
                if env["name"].startswith("TUNEFORGE_"):
                    assert env["name"] in env_names(SETTINGS[svc]), f"{name}/{container['name']}: {env['name']}"
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                bundle = bundles[ref["name"]]
                for key in {**bundle.get("data", {}), **bundle.get("stringData", {})}:
                    shared.setdefault(key, set()).add(svc)
    for key, services in shared.items():
        if key.startswith("TUNEFORGE_"):
            readers = [svc for svc in services if key in env_names(SETTINGS[svc])]
            assert readers, f"{key} is loaded by {sorted(services)} but none of their settings reads it"


# -- compose -------------------------------------------------------------------------------------------------

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_service_settings(name: str) -> type[BaseSettings]:
    image = COMPOSE["services"][name]["image"]
    return SETTINGS[service_of(image.replace(":latest", ":0"))]


def test_compose_has_postgres_nats_jetstream_migrations_and_every_service() -> None:
    services = COMPOSE["services"]
    expected = {"postgres", "nats", "migrate-catalog", "migrate-jobs", "catalog", "jobs", "gateway", "trainer"}
    assert set(services) == expected
    assert "-js" in services["nats"]["command"]
    for name in ("migrate-catalog", "migrate-jobs"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert services[name]["restart"] == "no"
    assert services["catalog"]["depends_on"]["migrate-catalog"]["condition"] == "service_completed_successfully"
    assert services["jobs"]["depends_on"]["migrate-jobs"]["condition"] == "service_completed_successfully"
    assert services["gateway"]["depends_on"]["jobs"]["condition"] == "service_healthy"
    assert services["trainer"]["depends_on"]["jobs"]["condition"] == "service_healthy"
    for name, service in services.items():
        if not name.startswith("migrate-"):
            assert service["healthcheck"]["test"], name
    (device,) = services["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if volume.startswith("."):  # a bind mount from this folder
                assert (DEPLOY / volume.split(":")[0]).is_file(), (name, volume)
            else:
                assert volume.split(":")[0] in COMPOSE["volumes"], (name, volume)
        if service["image"].startswith("tuneforge/"):  # built here, never pulled
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name


def test_compose_databases_are_the_ones_postgres_creates() -> None:
    """The catalog and jobs each have a database (both own an `outbox` table): POSTGRES_DB and the init script."""
    text = (DEPLOY / "compose.yaml").read_text()
    used = set(re.findall(r"@postgres:5432/(\w+)", text))
    created = {COMPOSE["services"]["postgres"]["environment"]["POSTGRES_DB"]}
    created |= set(re.findall(r"CREATE DATABASE (\w+);", (DEPLOY / "postgres-init.sql").read_text()))
    assert used == created == {"tuneforge_catalog", "tuneforge_jobs"}


def test_compose_healthchecks_probe_the_ports_the_services_listen_on() -> None:
    services = COMPOSE["services"]
    for name, port_var in (("catalog", "TUNEFORGE_CATALOG_GRPC_PORT"), ("jobs", "TUNEFORGE_JOBS_GRPC_PORT")):
        assert services[name]["healthcheck"]["test"][-1] == services[name]["environment"][port_var]
    assert (
        services["trainer"]["healthcheck"]["test"][-1]
        == services["trainer"]["environment"]["TUNEFORGE_AGENT_GRPC_PORT"]
    )


def test_every_tuneforge_variable_in_compose_is_a_setting_its_service_reads() -> None:
    for name, service in COMPOSE["services"].items():
        if name in ("postgres", "nats"):
            continue
        if name == "trainer":  # the trainer never gets the services' shared secret
            assert "TUNEFORGE_SERVICE_TOKEN" not in service["environment"]
        known = env_names(compose_service_settings(name))
        for var in service["environment"]:
            if var.startswith("TUNEFORGE_"):
                assert var in known, f"compose service {name}: {var} is not read by its settings"


def test_every_variable_compose_interpolates_is_in_the_env_example() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    example = {
        line.split("=", 1)[0]
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used <= example, f"not in deploy/.env.example: {sorted(used - example)}"


# -- container files -----------------------------------------------------------------------------------------


def dockerfile(svc: str) -> list[str]:
    """Instructions with their continuation lines joined."""
    text = (DEPLOY / f"{svc}.Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("svc", SERVICES)
def test_container_file_copies_paths_that_exist_and_runs_as_non_root(svc: str) -> None:
    lines = dockerfile(svc)
    for line in lines:
        if line.startswith("COPY") and "--from=" not in line:
            *sources, _ = shlex.split(line)[1:]
            for source in sources:
                assert (REPO / source).exists(), f"{svc}.Dockerfile copies {source}, which does not exist"
    assert (DEPLOY / f"{svc}.Dockerfile.dockerignore").is_file(), svc
    users = [line.split()[1] for line in lines if line.startswith("USER")]
    assert users and users[-1] not in ("0", "root"), svc
    assert any(line.startswith("HEALTHCHECK") for line in lines), svc
    # The command's module exists in the package the image installs.
    (cmd,) = [line for line in lines if line.startswith("CMD")]
    module = re.search(r'"-m", "([\w.]+)"', cmd)
    assert module and importlib.util.find_spec(module.group(1)) is not None, cmd


@pytest.mark.parametrize("svc", SERVICES)
def test_container_file_sets_only_variables_its_settings_read(svc: str) -> None:
    for line in dockerfile(svc):
        if line.startswith("ENV"):
            for name in re.findall(r"(TUNEFORGE_\w+)=", line):
                assert name in env_names(SETTINGS[svc]), f"{svc}.Dockerfile sets {name}"


def test_only_the_trainer_image_installs_torch_on_a_cuda_base() -> None:
    trainer = dockerfile("trainer")
    assert re.fullmatch(r"FROM nvidia/cuda:12\.[\d.]+-(cudnn-)?runtime-\S+", trainer[0])
    torch_at = next(i for i, line in enumerate(trainer) if re.search(r"pip install .*torch==[\d.]+", line))
    trainer_at = next(i for i, line in enumerate(trainer) if re.search(r"pip install .*services/trainer", line))
    # torch pinned and installed before the trainer package, as `make install` does.
    assert torch_at < trainer_at
    for svc in ("catalog", "jobs", "gateway"):
        assert not any("torch" in line for line in dockerfile(svc)), svc
        project = tomllib.loads((REPO / "services" / svc / "pyproject.toml").read_text())["project"]
        requirements = project["dependencies"] + sum(project.get("optional-dependencies", {}).values(), [])
        assert not [r for r in requirements if re.match(r"torch\b", r)], svc
    gateway = dockerfile("gateway")
    assert gateway[0].startswith("FROM node:") and any("npm run build" in line for line in gateway)


# -- the scripts the images run --------------------------------------------------------------------------------


@pytest.mark.parametrize("svc", ["catalog", "jobs"])
def test_migrate_script_brings_a_fresh_database_to_head(svc: str, tmp_path: Path) -> None:
    db = tmp_path / f"{svc}.db"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        f"TUNEFORGE_{svc.upper()}_DATABASE_URL": f"sqlite+aiosqlite:///{db}",
    }
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "migrate.py"), svc],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"{svc}: schema at head" in done.stdout
    import sqlite3

    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("select name from sqlite_master where type='table'")}
    assert f"alembic_version_{svc}" in tables and "outbox" in tables


def test_migrate_script_rebuilds_the_metric_rollups_of_jobs_only_when_asked(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TUNEFORGE_JOBS_DATABASE_URL": "sqlite+aiosqlite:///j.db"}
    script = [sys.executable, str(DEPLOY / "migrate.py")]
    done = subprocess.run(
        [*script, "jobs", "--rebuild-metric-blocks"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "jobs: metric rollups rebuilt for 0 jobs" in done.stdout
    refused = subprocess.run(
        [*script, "catalog", "--rebuild-metric-blocks"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--rebuild-metric-blocks" in refused.stderr


def test_migrate_script_refuses_an_unknown_service() -> None:
    done = subprocess.run([sys.executable, str(DEPLOY / "migrate.py"), "gateway"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: migrate.py catalog|jobs" in done.stderr


async def test_healthcheck_script_passes_on_serving_and_fails_on_not_serving() -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def check() -> int:
        proc = await asyncio.create_subprocess_exec(sys.executable, str(DEPLOY / "healthcheck.py"), str(port))
        return await proc.wait()

    try:
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert await check() == 0
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await check() == 1
    finally:
        await server.stop(None)
