"""Static checks of the deployment files under cluster/ (issue 6): no cluster, no network, no Docker.

Every Kubernetes manifest is validated against the Kubernetes JSON schemas bundled with
kubernetes-validate (strict: unknown fields are errors, as with `kubectl apply --validate=strict`),
RayCluster/RayJob objects against the KubeRay CRD excerpt shipped in cluster/schemas/ with their
embedded Kubernetes types (pod templates, env vars ...) checked against the same Kubernetes schemas,
and the `ray up` config against Ray's own ray-schema.json. Then the settings that matter: token
authentication everywhere, GPUs requested by the workers, the Tune storage path on a shared volume,
no plaintext secret, MLflow with authentication behind a ClusterIP Service, pinned non-root images.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from dockerfile_parse import DockerfileParser
from referencing import Registry, Resource

from tune_jobs.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
EXAMPLE_SECRETS = CLUSTER / "secrets.example.yaml"
MANIFESTS = sorted([*CLUSTER.glob("kuberay/*.yaml"), *CLUSTER.glob("mlflow/*.yaml"), EXAMPLE_SECRETS])
K8S_VERSIONS = ["1.30.0", "1.37.0"]  # oldest and newest that the manifests are meant for
K8S_DEFS = "https://kubernetes.io/api/_definitions.json"
SENSITIVE = re.compile(r"TOKEN|PASSWORD|SECRET|KEY", re.I)
PAPER = tomllib.loads((ROOT / "tune_jobs/specs/paper.toml").read_text())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


ALL = [(p, d) for p in MANIFESTS for d in _docs(p)]


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in ALL if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------- schema validation

def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:300]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path,doc", [(p, d) for p, d in ALL if "ray.io" not in d["apiVersion"]],
                         ids=lambda v: v.name if isinstance(v, Path) else v["kind"] if isinstance(v, dict) else None)
def test_kubernetes_manifest_is_valid(path, doc, version):
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']}: {_short(err)}")


def _k8s_registry() -> Registry:
    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSIONS[-1]}-local-strict"
    defs = json.loads((folder / "_definitions.json").read_text())
    return Registry().with_resource(K8S_DEFS, Resource.from_contents(defs))


def _to_json_schema(node):
    """openAPIV3Schema (structural) -> JSON Schema: embedded Kubernetes types become $refs into the
    Kubernetes schemas, int-or-string becomes anyOf, and objects reject unknown fields (strict)."""
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    desc = node.get("description", "")
    if desc.startswith("Kubernetes type "):
        return {"$ref": f"{K8S_DEFS}#/$defs/{desc.split()[2]}"}
    out = {k: _to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")
           and k not in ("default", "description", "format")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable"):
        out.pop("nullable")
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def _crd_validators() -> dict[tuple[str, str], jsonschema.Draft202012Validator]:
    registry, validators = _k8s_registry(), {}
    for crd in _docs(CLUSTER / "schemas" / "kuberay-v1-crds.yaml"):
        for v in crd["spec"]["versions"]:
            schema = _to_json_schema(v["schema"]["openAPIV3Schema"])
            key = (f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])
            validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    return validators


CRDS = _crd_validators()


def _crd_errors(doc: dict) -> list[str]:
    validator = CRDS[(doc["apiVersion"], doc["kind"])]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("path,doc", [(p, d) for p, d in ALL if "ray.io" in d["apiVersion"]],
                         ids=lambda v: v.name if isinstance(v, Path) else v["kind"] if isinstance(v, dict) else None)
def test_kuberay_resource_matches_crd(path, doc):
    assert not _crd_errors(doc), f"{path.relative_to(ROOT)}: {_crd_errors(doc)}"
    object_meta = {"$ref": f"{K8S_DEFS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    jsonschema.Draft202012Validator(object_meta, registry=_k8s_registry()).validate(doc["metadata"])


def test_crd_validation_catches_mistakes():
    """The validators are not vacuous: a typo in a pod template, a missing required field, a bad
    enum and a wrongly typed Ray field are all rejected."""
    cluster = _one("RayCluster")
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    assert any("resource" in e for e in _crd_errors(broken))
    broken = copy.deepcopy(cluster)
    del broken["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    assert _crd_errors(broken)
    broken = copy.deepcopy(cluster)
    broken["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    assert _crd_errors(broken)
    broken = copy.deepcopy(cluster)
    broken["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert _crd_errors(broken)
    job = copy.deepcopy(_one("RayJob"))
    job["spec"]["entrypointNumGpus"] = "one"
    assert _crd_errors(job)


def test_ray_up_config_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((CLUSTER / "ray-up.yaml").read_text()), schema)


# ---------------------------------------------------------------- settings that matter

def _ray_pod_specs(spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return pods


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _assert_token_auth(where: str, env: dict[str, dict]):
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token missing"
    token = env.get("RAY_AUTH_TOKEN", {})
    assert "value" not in token and token.get("valueFrom", {}).get("secretKeyRef", {}).get("name"), \
        f"{where}: RAY_AUTH_TOKEN must come from a Secret (valueFrom.secretKeyRef)"


def test_token_auth_on_every_ray_container():
    cluster = _one("RayCluster")
    for group, pod in _ray_pod_specs(cluster["spec"]):
        for c in pod["containers"]:
            _assert_token_auth(f"{group}/{c['name']}", _env(c))
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    _assert_token_auth("autoscaler", _env(cluster["spec"]["autoscalerOptions"]))
    job = _one("RayJob")
    for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]:
        _assert_token_auth(f"RayJob submitter/{c['name']}", _env(c))


def test_gpu_worker_groups_request_gpus_and_autoscale():
    cluster = _one("RayCluster")
    trial_cpus, trial_gpus = PAPER["resources"]["cpus"], PAPER["resources"]["gpus"]
    groups = cluster["spec"]["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"] and g["maxReplicas"] > g["minReplicas"]
        res = g["template"]["spec"]["containers"][0]["resources"]
        gpus = int(res["limits"]["nvidia.com/gpu"])
        assert gpus >= 1 and res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
        # Ray's CPUs on the node hold every trial that fits on its GPUs, and the pod has those CPUs.
        ray_cpus = int(g["rayStartParams"]["num-cpus"])
        assert ray_cpus >= gpus / trial_gpus * trial_cpus
        assert float(res["limits"]["cpu"]) >= ray_cpus
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "trials must not land on the head"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def _entrypoint_args() -> list[str]:
    entry = _one("RayJob")["spec"]["entrypoint"]
    return shlex.split(entry.split("&&")[-1])


def test_rayjob_runs_the_paper_sweep_on_the_cluster():
    job, cluster = _one("RayJob"), _one("RayCluster")
    assert _entrypoint_args() == ["attzoom", "sweep", "tune_jobs/specs/paper.toml", "--address", "auto",
                                  "--storage", PAPER["storage"], "--tracking-uri", PAPER["tracking_uri"], "--continue"]
    # a RayJob applied again continues the sweep its first run started (plain `sweep` refused the taken name, exit 2)
    assert build_parser().parse_args(_entrypoint_args()[1:]).go_on
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert (ROOT / "tune_jobs/specs/paper.toml").exists()


def test_tune_storage_and_data_are_shared_volumes():
    """Every Ray pod mounts the same ReadWriteMany claim above the RayJob's --storage path (a trial
    restored on another node finds its checkpoint), and the spec's data_root."""
    args = _entrypoint_args()
    storage = args[args.index("--storage") + 1]
    claims = {d["metadata"]["name"]: d for _, d in ALL if d["kind"] == "PersistentVolumeClaim"}
    for group, pod in _ray_pod_specs(_one("RayCluster")["spec"]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for c in pod["containers"] for m in c.get("volumeMounts", [])}
        for path, want_rwx in ((storage, True), (PAPER["data_root"], False)):
            above = [m for p, m in mounts.items() if path == p or path.startswith(p.rstrip("/") + "/")]
            assert above, f"{group}: nothing mounted at {path}"
            claim = volumes[above[0]["name"]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims, f"{group}: claim {claim} not defined in cluster/"
            if want_rwx:
                assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
                assert not above[0].get("readOnly")


def _walk(node, path=""):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _plaintext_secrets(docs: list[tuple[Path, dict]]) -> list[str]:
    problems = []
    for path, doc in docs:
        where = f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Secret":
            if path != EXAMPLE_SECRETS:
                problems.append(f"{where}: Secrets belong in secrets.example.yaml or kubectl")
            for key, value in {**doc.get("stringData", {}), **doc.get("data", {})}.items():
                if SENSITIVE.search(key) and "CHANGE-ME" not in value:
                    problems.append(f"{where}: {key} is not a placeholder")
            continue
        for at, node in _walk(doc):
            if "name" in node and ("value" in node or "valueFrom" in node):  # an EnvVar
                if SENSITIVE.search(node["name"]) and "value" in node:
                    problems.append(f"{where}{at}: {node['name']} has an inline value; use valueFrom.secretKeyRef")
                for userinfo in re.findall(r"://([^/@\s]+)@", str(node.get("value", ""))):
                    if not re.fullmatch(r"(\$\([A-Z_]+\))(:\$\([A-Z_]+\))?", userinfo):
                        problems.append(f"{where}{at}: credentials in a URI must be $(VAR) references")
    return problems


def test_no_plaintext_secret():
    assert _plaintext_secrets(ALL) == []
    assert "RAY_AUTH_TOKEN=" not in (CLUSTER / "ray-up.yaml").read_text()


def test_plaintext_secret_check_catches_inline_values():
    path = CLUSTER / "kuberay" / "raycluster.yaml"
    cluster = copy.deepcopy(_one("RayCluster"))
    env = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"})
    env.append({"name": "DB_URI", "value": "postgresql://mlflow:hunter2@postgres/mlflow"})
    secret = {"kind": "Secret", "metadata": {"name": "leak"}, "stringData": {"token": "abc"}}
    assert len(_plaintext_secrets([(path, cluster), (EXAMPLE_SECRETS, secret)])) == 3


def test_uri_credentials_refer_to_secret_backed_env():
    deploy = _one("Deployment", "mlflow")
    env = _env(deploy["spec"]["template"]["spec"]["containers"][0])
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert uri.startswith("postgresql://")
    for var in re.findall(r"\$\(([A-Z_]+)\)", uri):
        assert "secretKeyRef" in env[var]["valueFrom"], f"{var} is not read from a Secret"
    assert list(env).index("POSTGRES_PASSWORD") < list(env).index("MLFLOW_BACKEND_STORE_URI"), \
        "Kubernetes expands $(VAR) only for variables defined earlier in the list"


def test_mlflow_has_auth_and_is_reached_through_a_clusterip_service():
    deploy, service = _one("Deployment", "mlflow"), _one("Service", "mlflow")
    pod = deploy["spec"]["template"]
    container = pod["spec"]["containers"][0]
    command = container["command"] + container["args"]
    assert "--app-name=basic-auth" in command
    env = _env(container)
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port = service["spec"]["ports"][0]
    assert PAPER["tracking_uri"] == f"http://{service['metadata']['name']}:{port['port']}"
    assert any(p["containerPort"] == 5000 for p in container["ports"]) and "--port=5000" in command
    # The sweep's driver runs on the head and alone writes MLflow (tune_jobs/mlflow_callback.py): the head gets the
    # credentials from the Secret, not inline; workers run trials, which never touch the store, and get none.
    for group, spec in _ray_pod_specs(_one("RayCluster")["spec"]):
        ray_env = _env(spec["containers"][0])
        if group == "head":
            assert "secretKeyRef" in ray_env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"], group
        else:
            assert not [k for k in ray_env if k.startswith("MLFLOW_")], group


def test_nothing_is_exposed_outside_the_cluster():
    for path, doc in ALL:
        assert doc["kind"] != "Ingress", path
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path}: {doc['metadata']['name']}"
    head = _one("RayCluster")["spec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress")


def test_ray_up_keeps_token_auth_and_loopback_dashboard():
    config = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    head, worker = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    for commands in (head, worker):
        start = [c for c in commands if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c for c in start)
    assert any("--dashboard-host=127.0.0.1" in c for c in head)
    assert "~/.ray/auth_token" in config["file_mounts"]  # the token travels as a file
    assert any(local == "." for local in config["file_mounts"].values())  # the project itself
    assert any("pip install" in c and "~/attzoom" in c for c in config["setup_commands"])
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] > t.get("min_workers", 0) for t in gpu_types)


# ---------------------------------------------------------------- container images

DOCKERFILES = [CLUSTER / "Dockerfile", CLUSTER / "mlflow" / "Dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_is_pinned_non_root_and_secret_free(path):
    # Static only: this repository's CI has no Docker engine to build the images.
    parser = DockerfileParser(path=str(path))
    for base in parser.parent_images:
        name, _, tag = base.partition("@")[0].rpartition(":")
        assert name and tag and tag != "latest", f"{path.name}: FROM {base} is not pinned by tag"
    users = [i["value"].split(":")[0].strip() for i in parser.structure if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{path.name}: must end as a non-root USER"
    for instr in parser.structure:
        if instr["instruction"] in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", instr["value"]) or [instr["value"].split()[0]]
            assert not any(SENSITIVE.search(n) for n in names), f"{path.name}: {instr['content'].strip()}"


def test_project_image_installs_the_project_from_its_sources():
    parser = DockerfileParser(path=str(CLUSTER / "Dockerfile"))
    copied = [p for i in parser.structure if i["instruction"] == "COPY"
              for p in i["value"].split()[:-1] if not p.startswith("--")]
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied, f"package {package} is not copied into the image"
    assert any(i["instruction"] == "RUN" and "pip install ." in i["value"] for i in parser.structure)
    assert "ray:2.60.0-py311" in parser.baseimage  # the Ray and Python versions pyproject.toml pins


def test_the_optuna_studies_live_in_the_clusters_postgres_with_credentials_from_its_secret():
    """paper.toml names a database, not a password: the head's driver gets PGUSER/PGPASSWORD from the Secret,
    and a new PostgreSQL creates that database beside MLflow's."""
    from sqlalchemy.engine import make_url

    url = make_url(PAPER["optuna_storage"])
    assert url.get_backend_name() == "postgresql" and url.password is None and url.username is None
    assert (url.host, url.database) == (_one("Service", "postgres")["metadata"]["name"], "optuna")
    head = _one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for name, key in (("PGUSER", "username"), ("PGPASSWORD", "password")):
        source = _env(head)[name]["valueFrom"]["secretKeyRef"]
        assert (source["name"], source["key"]) == ("mlflow-postgres", key)
    init = _one("ConfigMap", "postgres-init")["data"]["optuna.sql"]
    assert f"CREATE DATABASE {url.database};" in init
    postgres = _one("StatefulSet", "postgres")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in postgres["containers"][0]["volumeMounts"]}
    assert mounts["init"] == "/docker-entrypoint-initdb.d"
    assert {"name": "init", "configMap": {"name": "postgres-init"}} in postgres["volumes"]
