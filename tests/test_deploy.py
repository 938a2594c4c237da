"""deploy/kubernetes/ checked offline, and the README's deployment commands checked against it.

Every manifest must be an object the Kubernetes API accepts: it is validated with the `kubernetes`
client's models (pydantic, unknown fields refused, types checked), so a misspelt field or a number
where a string belongs fails here, not at `kubectl apply`. Then what the deployment promises: a GPU
per pod, probes and a preStop hook that exist in scripts/health_probe.py, time for setup and for a
prediction to finish, every setting of the README's table as environment (and parseable), tokens from
the Secret only, volumes where the settings point. The README's commands apply exactly these files,
in an order that works, and name the objects, Secret, keys and image the manifests use.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest
import yaml
from kubernetes import client

from flux_day.config import Settings
from scripts.health_probe import CHECKS
from tests.harness.cog_server import ROOT

MANIFESTS = ROOT / "deploy" / "kubernetes"
MODELS = {
    ("apps/v1", "Deployment"): client.V1Deployment,
    ("batch/v1", "Job"): client.V1Job,
    ("v1", "Service"): client.V1Service,
    ("v1", "PersistentVolumeClaim"): client.V1PersistentVolumeClaim,
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, document)
        for path in sorted(MANIFESTS.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document is not None
    ]


def objects() -> dict[str, Any]:
    """Each manifest object as its client model, by kind and name (`Deployment/flux-day`)."""
    found = {}
    for _, document in documents():
        model = MODELS[(document["apiVersion"], document["kind"])].model_validate(document)
        found[f"{document['kind']}/{model.metadata.name}"] = model
    return found


def one(kind: str) -> Any:
    (found,) = [model for key, model in objects().items() if key.startswith(f"{kind}/")]
    return found


def readme_section(title: str) -> str:
    return (ROOT / "README.md").read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def commands(section: str, heading: str) -> list[list[str]]:
    """The shell commands (split into words, comments dropped) of the fenced blocks under `### heading`."""
    part = section.split(f"\n### {heading}\n", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", part, flags=re.S)
    return [
        shlex.split(line, comments=True) for block in blocks for line in block.splitlines() if line.strip()
    ]


@pytest.mark.parametrize(
    ("name", "document"),
    documents(),
    ids=[f"{name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}" for name, doc in documents()],
)
def test_every_manifest_is_an_object_the_kubernetes_api_accepts(name: str, document: dict[str, Any]) -> None:
    model = MODELS.get((document.get("apiVersion"), document.get("kind")))
    assert model is not None, f"{name}: an unexpected kind {document.get('kind')}"
    model.model_validate(document)  # raises on an unknown field, a wrong type or a missing required one


def test_a_misspelt_field_is_caught_by_the_same_check() -> None:
    (_, document) = next(item for item in documents() if item[1]["kind"] == "Deployment")
    container = document["spec"]["template"]["spec"]["containers"][0]
    broken = {**document}
    broken["spec"] = {
        **document["spec"],
        "template": {
            **document["spec"]["template"],
            "spec": {
                **document["spec"]["template"]["spec"],
                "containers": [{**container, "readinesProbe": container["readinessProbe"]}],
            },
        },
    }
    with pytest.raises(ValueError, match="readinesProbe"):
        client.V1Deployment.model_validate(broken)


def container(kind: str = "Deployment") -> client.V1Container:
    (found,) = one(kind).spec.template.spec.containers
    return found


def test_each_replica_gets_one_gpu_and_probes_that_read_the_servers_status() -> None:
    predictor = container()
    assert (
        predictor.resources.requests["nvidia.com/gpu"] == predictor.resources.limits["nvidia.com/gpu"] == "1"
    )
    probes = {
        "startup": predictor.startup_probe,
        "readiness": predictor.readiness_probe,
        "liveness": predictor.liveness_probe,
    }
    checks = {}
    for name, probe in probes.items():
        assert probe.var_exec.command[:2] == ["python", "scripts/health_probe.py"], name
        checks[name] = probe.var_exec.command[2]
    assert checks == {"startup": "started", "readiness": "ready", "liveness": "alive"}
    assert set(checks.values()) <= set(CHECKS)
    startup = predictor.startup_probe
    assert startup.period_seconds * startup.failure_threshold >= 1800  # loading and compiling at setup
    assert [port.container_port for port in predictor.ports] == [5000]  # Cog's port


def test_a_prediction_under_way_finishes_before_the_pod_goes() -> None:
    deployment = one("Deployment")
    hook = container().lifecycle.pre_stop.var_exec.command
    assert hook[:3] == ["python", "scripts/health_probe.py", "idle"]
    waits = float(hook[hook.index("--timeout") + 1])
    assert waits >= 300
    assert deployment.spec.template.spec.termination_grace_period_seconds > waits + 5  # + the settle pause
    assert deployment.spec.strategy.rolling_update.max_surge == 0  # an update asks for no extra GPU


def test_every_setting_is_in_the_environment_and_tokens_come_from_the_secret() -> None:
    table = readme_section("Settings (environment)")
    settings = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", "\n".join(re.findall(r"^\| ([^|]+)\|", table, re.M))))
    assert {"FLUX_DAY_WEIGHTS", "FLUX_DAY_LORA_CACHE", "HF_TOKEN", "COG_WEIGHTS"} <= settings
    env = {variable.name: variable for variable in container().env}
    assert settings <= set(env), settings - set(env)
    for name, variable in env.items():
        if name.endswith("_TOKEN"):
            assert variable.value is None and variable.value_from.secret_key_ref.key == name, name
    values = {name: variable.value for name, variable in env.items() if variable.value is not None}
    parsed = Settings.from_env(values)  # every value is one the predictor reads
    assert parsed.offline and parsed.device == "cuda" and not parsed.allow_private_urls
    claims = {
        claim.metadata.name: claim
        for key, claim in objects().items()
        if key.startswith("PersistentVolumeClaim/")
    }
    mounts = {mount.mount_path: mount for mount in container().volume_mounts}
    volumes = {
        volume.name: volume.persistent_volume_claim for volume in one("Deployment").spec.template.spec.volumes
    }
    weights, cache = mounts[str(parsed.weights)], mounts[str(parsed.lora_cache)]
    assert weights.read_only and not cache.read_only
    cache_claim = claims[volumes[cache.name].claim_name]
    assert "ReadWriteMany" in cache_claim.spec.access_modes  # every replica writes the one cache
    assert parsed.lora_cache_bytes < _bytes(cache_claim.spec.resources.requests["storage"])
    assert volumes[weights.name].claim_name in claims
    # fp8 copies and compiled kernels are written by replicas: a shared writable volume, not the weights'.
    for folder in (parsed.fp8_cache, parsed.compile_cache):
        assert folder is not None
        (mount,) = [m for path, m in mounts.items() if str(folder).startswith(path + "/")]
        assert (
            not mount.read_only
            and "ReadWriteMany" in claims[volumes[mount.name].claim_name].spec.access_modes
        )


def test_the_job_fills_the_volume_the_replicas_read_with_the_same_image() -> None:
    job, predictor = container("Job"), container()
    assert job.image == predictor.image
    assert job.command[:2] == ["python", "scripts/download_weights.py"]
    target = job.command[job.command.index("--weights") + 1]
    (mount,) = [mount for mount in job.volume_mounts if mount.mount_path == target]
    job_volumes = {
        volume.name: volume.persistent_volume_claim.claim_name
        for volume in one("Job").spec.template.spec.volumes
    }
    deployment_volumes = {
        volume.name: volume.persistent_volume_claim.claim_name
        for volume in one("Deployment").spec.template.spec.volumes
    }
    weights_mount = next(m for m in predictor.volume_mounts if m.read_only)
    assert job_volumes[mount.name] == deployment_volumes[weights_mount.name]
    assert {variable.name for variable in job.env} >= {"HF_TOKEN", "HF_ENDPOINT"}


def test_the_service_reaches_the_predictor_pods_and_not_the_job() -> None:
    service, deployment, job = one("Service"), one("Deployment"), one("Job")
    selector = service.spec.selector.items()
    assert selector <= deployment.spec.template.metadata.labels.items()
    assert not selector <= job.spec.template.metadata.labels.items()
    (port,) = service.spec.ports
    assert port.target_port in {p.name for p in container().ports}


def test_the_readme_commands_apply_exactly_these_manifests_in_a_working_order() -> None:
    lines = commands(readme_section("Deployment: many replicas"), "Kubernetes")
    applied = [
        word.removeprefix("deploy/kubernetes/")
        for line in lines
        if line[:2] == ["kubectl", "apply"]
        for word in line
        if word.startswith("deploy/")
    ]
    assert sorted(applied) == sorted(path.name for path in MANIFESTS.glob("*.yaml"))
    assert (
        applied.index("volumes.yaml")
        < applied.index("download-weights-job.yaml")
        < applied.index("deployment.yaml")
    )
    order = [" ".join(line) for line in lines]
    job_name = one("Job").metadata.name
    waits = [i for i, line in enumerate(order) if f"job/{job_name}" in line and "condition=complete" in line]
    starts = [i for i, line in enumerate(order) if "deployment.yaml" in line]
    assert waits and starts and waits[0] < starts[0], "wait for the weights Job before the Deployment"

    named = {
        word for line in lines for word in line if re.fullmatch(r"(job|deployment|service)/[a-z0-9-]+", word)
    }
    assert named == {
        f"job/{job_name}",
        f"deployment/{one('Deployment').metadata.name}",
        f"service/{one('Service').metadata.name}",
    }

    (secret,) = [line for line in lines if line[:4] == ["kubectl", "create", "secret", "generic"]]
    created = {word.split("=", 2)[1] for word in secret if word.startswith("--from-literal=")}
    referenced = {
        (variable.value_from.secret_key_ref.name, variable.value_from.secret_key_ref.key)
        for kind in ("Deployment", "Job")
        for variable in container(kind).env
        if variable.value_from is not None and variable.value_from.secret_key_ref is not None
    }
    assert {name for name, _ in referenced} == {secret[4]}
    assert {key for _, key in referenced} == created

    (build,) = [line for line in lines if line[:2] == ["cog", "build"]]
    image = build[build.index("-t") + 1]
    assert ["docker", "push", image] == build[build.index("&&") + 1 :]
    assert container().image == container("Job").image == image


def test_the_readme_and_cog_yaml_run_one_container_per_gpu_on_the_same_folders() -> None:
    lines = commands(readme_section("Deployment: many replicas"), "One machine, several GPUs")
    servers = [line for line in lines if line[:2] == ["docker", "run"] and "--gpus" in line]
    assert len(servers) >= 2
    gpus = [line[line.index("--gpus") + 1] for line in servers]
    ports = [line[line.index("-p") + 1].split(":")[0] for line in servers]
    volumes = [sorted(line[i + 1] for i, word in enumerate(line) if word == "-v") for line in servers]
    assert len(set(gpus)) == len(set(ports)) == len(servers) and all(g.startswith("device=") for g in gpus)
    assert all(v == volumes[0] for v in volumes) and any(v.endswith(":/src/weights:ro") for v in volumes[0])
    assert all("FLUX_DAY_LORA_CACHE=/lora-cache" in line for line in servers)
    assert any(v.endswith(":/lora-cache") for v in volumes[0])
    assert all("FLUX_DAY_FP8_CACHE=/artifacts/fp8-cache" in line for line in servers)
    assert any(v.endswith(":/artifacts") for v in volumes[0])
    section = readme_section("Deployment: many replicas")
    cog_yaml = (ROOT / "cog.yaml").read_text()
    for text in (section, cog_yaml):
        assert "CUDA_VISIBLE_DEVICES=" in text and "--gpus device=" in text


def _bytes(quantity: str) -> int:
    """A Kubernetes quantity in bytes (the binary suffixes these manifests use)."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", quantity)
    assert match is not None, quantity
    return int(match[1]) * 1024 ** {None: 0, "Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4}[match[2]]
