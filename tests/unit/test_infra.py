"""The cluster definitions are checked here, without a cloud: ray_cluster.yaml against Ray's own
cluster-config schema and the preparation `ray up` applies; every manifest under infra/ for the
fields its kind needs; the entrypoints against the real CLI and config; no file holds a secret.

Nothing here launches machines or talks to Kubernetes: that the files deploy is not tested.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import re
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

from pipelines.cli import build_parser
from pipelines.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_FILE = ROOT / "ray_cluster.yaml"
INFRA = ROOT / "infra"
MANIFESTS = sorted(INFRA.rglob("*.yaml"))
NAMESPACE = "ganpipe"
EXAMPLE_ACCOUNT = "123456789012"  # AWS's documentation account id: a placeholder
PLACEHOLDER = "REPLACE_WITH_"


def _ray_schema() -> dict[str, Any]:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_FILE.read_text())


# ---------------------------------------------------------------- ray_cluster.yaml


def test_cluster_file_matches_rays_schema_and_survives_ray_up_preparation(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cluster, _ray_schema())
    # What `ray up` does before it touches AWS: merge the provider's defaults, fill per-type
    # worker limits, validate again (plus Ray's own cross-field checks).
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


def test_the_schema_check_catches_mistakes(cluster):
    """The check above can fail: typical slips are refused."""
    schema = _ray_schema()
    for mutate in (
        lambda c: c["available_node_types"]["gpu"]["resources"].update(GPU="1"),
        lambda c: c["available_node_types"]["gpu"].update(max_worker=2),
        lambda c: c["docker"].update(imgae="x"),
        lambda c: c.pop("provider"),
    ):
        broken = copy.deepcopy(cluster)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_cluster_shape_cpu_head_gpu_workers_on_demand_and_spot(cluster):
    assert cluster["provider"]["type"] == "aws"
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    spot = [t for t in workers.values() if "InstanceMarketOptions" in t["node_config"]]
    on_demand = [t for t in workers.values() if "InstanceMarketOptions" not in t["node_config"]]
    assert spot and on_demand
    assert all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in spot)
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"]
    for t in types.values():  # S3 through an instance profile on every node, never keys
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_cluster_runs_the_project_image_with_tracking_and_token_auth(cluster):
    docker = cluster["docker"]
    assert "ganpipe" in docker["image"]
    env = dict(
        opt.split(" ", 1)[1].split("=", 1)
        for opt in docker["run_options"]
        if opt.startswith("--env ")
    )
    assert env["MLFLOW_TRACKING_URI"].startswith("http")
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] in cluster["file_mounts"]


def test_dashboard_is_bound_privately(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head
    # Only SSH is opened from outside, and not to the whole internet.
    for rule in cluster["provider"]["security_group"]["IpPermissions"]:
        assert (rule["FromPort"], rule["ToPort"]) == (22, 22)
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule["IpRanges"])


# ---------------------------------------------------------------- infra/ manifests


def _documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    containers = pod_template["spec"]["containers"]
    assert containers, "a pod template without containers"
    for c in containers:
        assert c["name"] and c["image"], c
    return containers


def _check_ray_cluster_spec(spec: dict[str, Any]) -> None:
    # The cluster's Ray is the one this project is tested with; clients and cluster must match.
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"]["num-cpus"] == "0"  # no training work on the head
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants str
    _containers(head["template"])
    groups = spec["workerGroupSpecs"]
    assert groups
    gpus = 0
    for group in groups:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        for c in _containers(group["template"]):
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            gpus += int(limits.get("nvidia.com/gpu", 0))
            # Kubernetes requires extended resources' requests to equal their limits.
            assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu")
    assert gpus >= 1, "no worker group asks for a GPU"


def _check_raycluster(doc: dict[str, Any]) -> None:
    _check_ray_cluster_spec(doc["spec"])
    assert doc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"


def _check_rayjob(doc: dict[str, Any]) -> None:
    spec = doc["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)  # exactly one
    if "rayClusterSpec" in spec:
        _check_ray_cluster_spec(spec["rayClusterSpec"])
        assert spec["shutdownAfterJobFinishes"] is True  # no GPU idles after the run


def _check_deployment(doc: dict[str, Any]) -> None:
    spec = doc["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    for c in _containers(spec["template"]):
        for port in c.get("ports", []):
            assert 0 < port["containerPort"] < 65536


def _check_statefulset(doc: dict[str, Any]) -> None:
    _check_deployment(doc)
    assert doc["spec"]["serviceName"]


def _check_service(doc: dict[str, Any]) -> None:
    spec = doc["spec"]
    assert spec["selector"] and spec["ports"]
    assert spec.get("type", "ClusterIP") == "ClusterIP"  # nothing here is exposed publicly
    for port in spec["ports"]:
        assert 0 < port["port"] < 65536


def _check_secret(doc: dict[str, Any]) -> None:
    assert doc.get("type", "Opaque") == "Opaque"
    values = dict(doc.get("stringData", {}))
    values.update({k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()})
    assert values
    for key, value in values.items():
        assert PLACEHOLDER in value, f"Secret {doc['metadata']['name']}/{key} holds a real value"


def _check_nothing(doc: dict[str, Any]) -> None:
    pass


CHECKS = {
    ("ray.io/v1", "RayCluster"): _check_raycluster,
    ("ray.io/v1", "RayJob"): _check_rayjob,
    ("apps/v1", "Deployment"): _check_deployment,
    ("apps/v1", "StatefulSet"): _check_statefulset,
    ("v1", "Service"): _check_service,
    ("v1", "Secret"): _check_secret,
    ("v1", "ServiceAccount"): _check_nothing,
    ("v1", "Namespace"): _check_nothing,
}


def test_there_are_manifests_of_every_expected_kind():
    kinds = Counter(doc["kind"] for _, doc in _documents())
    for kind in ("RayCluster", "RayJob", "Deployment", "Service", "Secret"):
        assert kinds[kind] >= 1, kind


@pytest.mark.parametrize(
    "path, doc",
    _documents(),
    ids=[f"{p.relative_to(INFRA)}:{d.get('kind')}" for p, d in _documents()],
)
def test_manifest_has_the_fields_of_its_kind(path, doc):
    key = (doc.get("apiVersion"), doc.get("kind"))
    assert key in CHECKS, f"{path}: {key} has no check here; add one"
    assert doc["metadata"]["name"]
    if doc["kind"] != "Namespace":
        assert doc["metadata"]["namespace"] == NAMESPACE
    CHECKS[key](doc)


def test_services_select_pods_that_exist():
    docs = [doc for _, doc in _documents()]
    pod_labels = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    ]
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert any(svc["spec"]["selector"].items() <= labels.items() for labels in pod_labels)


def test_every_referenced_secret_and_service_account_is_defined():
    docs = [doc for _, doc in _documents()]
    defined = {(d["kind"], d["metadata"]["name"]) for d in docs}
    text = "\n".join(p.read_text() for p in MANIFESTS)
    for name in re.findall(r"secretKeyRef: \{name: ([\w-]+)", text):
        assert ("Secret", name) in defined, name
    for name in re.findall(r"serviceAccountName: ([\w-]+)", text):
        assert ("ServiceAccount", name) in defined, name


def test_mlflow_server_uses_postgres_from_the_secret_and_s3_artifacts():
    mlflow = next(d for _, d in _documents() if d["kind"] == "Deployment")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--serve-artifacts" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    secret = next(d for _, d in _documents() if d["kind"] == "Secret")
    assert secret["stringData"]["backend-store-uri"].startswith("postgresql://")


# ---------------------------------------------------------------- entrypoints, image


def test_rayjob_entrypoint_is_a_valid_ganpipe_run():
    job = next(d for _, d in _documents() if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["ganpipe", "run"]
    args = build_parser().parse_args(argv[1:])
    config = load_config(args.config, args.overrides)  # refuses unknown keys and bad values
    assert config.train.use_gpu
    assert config.workdir.startswith("s3://")  # storage every pod sees


def test_dockerfile_builds_on_cuda_installs_the_project_and_drops_root():
    text = (INFRA / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    base = next(line for line in instructions if line.startswith("ARG RAY_IMAGE="))
    assert base.endswith(f"rayproject/ray:{ray.__version__}-py311-gpu")  # CUDA, same Ray
    assert any("pip install" in line and " ." in line for line in instructions)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert not any(line.startswith(("ENV AWS_", "ARG AWS_")) for line in instructions)


# ---------------------------------------------------------------- no credentials anywhere

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key setting": re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*\S+"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "Slack token": re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}"),
}
URI_PASSWORD = re.compile(r"://[^/\s:@]+:([^@\s/]+)@")
ACCOUNT_ID = re.compile(r"arn:aws:iam::(\d{12}):")


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def credential_findings(text: str) -> list[str]:
    """What in ``text`` looks like a real credential (empty: nothing)."""
    found = [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]
    for password in URI_PASSWORD.findall(text):
        if PLACEHOLDER not in password and not password.startswith("$"):
            found.append(f"password in a URI: {password[:3]}…")
    for account in ACCOUNT_ID.findall(text):
        if account != EXAMPLE_ACCOUNT:
            found.append(f"AWS account id {account}")
    # Long random-looking strings (tokens, keys) that none of the patterns above know.
    for word in re.findall(r"[A-Za-z0-9+/=_\-]{32,}", text):
        classes = sum(bool(re.search(p, word)) for p in ("[a-z]", "[A-Z]", "[0-9]"))
        if classes >= 2 and _entropy(word) > 4.0:
            found.append(f"random-looking string {word[:6]}…")
    return found


INFRA_FILES = [CLUSTER_FILE, *sorted(p for p in INFRA.rglob("*") if p.is_file())]


@pytest.mark.parametrize("path", INFRA_FILES, ids=[str(p.relative_to(ROOT)) for p in INFRA_FILES])
def test_no_real_credentials_in_cluster_files(path):
    assert credential_findings(path.read_text()) == []


def test_the_credential_scan_finds_planted_secrets():
    # Built at run time so that this file itself holds none of them.
    planted = [
        "AKIA" + "Q" * 16,
        "aws_secret_access_key = " + "x" * 40,
        "-----BEGIN RSA " + "PRIVATE KEY-----",
        "uri: postgresql://mlflow:" + "hunter2" + "@db:5432/mlflow",
        "arn:aws:iam::" + "210987654321" + ":role/x",
        "token: " + "9fK2mQ7vXzL1pR8sT4wY6bN3cD5eG0hJ",
    ]
    for text in planted:
        assert credential_findings(text), text
    assert credential_findings("postgresql://mlflow:REPLACE_WITH_DB_PASSWORD@postgres/mlflow") == []
