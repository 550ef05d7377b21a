"""Every manifest and every rendered overlay is schema-valid, and the pieces agree with each other.

No API server runs here, so validity means: core kinds pass kubernetes-validate in strict mode (unknown
fields rejected) against the newest Kubernetes version it ships; KubeRay kinds pass the CRD's
openAPIV3Schema (tests/schemas/kuberay, vendored from ../shared/k8s-schemas) with jsonschema after `closed_schema` (below) makes
unknown fields errors, as the API server's pruning would silently drop them. Overlays are rendered by
`kubectl kustomize`; a missing kubectl FAILS these tests (it is part of the machine image).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
CRD_DIR = REPO / "tests" / "schemas" / "kuberay"  # KubeRay CRDs vendored from ../shared/k8s-schemas (SOURCE.txt)
OVERLAYS = ("gpu", "dev")
KUSTOMIZATIONS = {"base": MANIFESTS / "base", **{o: MANIFESTS / "overlays" / o for o in OVERLAYS}}
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
# The newest Kubernetes schema set that kubernetes-validate ships (1.37 with kubernetes-validate 1.37).
K8S_VERSION = latest_version()
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# File name stem ending per kind (one kind per file, named after it, e.g. ray-cluster.gpu.yaml).
FILE_SUFFIX = {"Namespace": "namespace", "Service": "service", "Deployment": "deployment",
               "StatefulSet": "statefulset", "PersistentVolumeClaim": "pvc", "RayCluster": "ray-cluster",
               "RayJob": "ray-job"}
SECRET_NAME_HINT = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Helpers (test_k8s_submit.py imports validate_object, render_kustomization, pod_specs, ray_pin)
# ---------------------------------------------------------------------------------------------


def closed_schema(node: Any) -> Any:
    """An OpenAPI v3 (CRD) schema turned into a JSON Schema that rejects unknown fields.

    Structural CRD schemas list an object's fields under `properties` and leave `additionalProperties`
    unset; JSON Schema then accepts any extra key, while the API server prunes it silently (a typo like
    `workerGroupSpec` would vanish). So, recursively: every schema with `properties`, no
    `additionalProperties` and no `x-kubernetes-preserve-unknown-fields: true` (the marker for
    "anything goes here") gets `additionalProperties: false`. `nullable: true` (OpenAPI 3.0) becomes
    a "null" member of `type`, which JSON Schema understands. Everything else is kept.

    Args:
        node: a schema (or any JSON value inside one).

    Returns:
        A transformed deep copy.
    """
    if isinstance(node, list):
        return [closed_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: closed_schema(value) for key, value in node.items()}
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The ray.io/v1 openAPIV3Schema of `kind`, as the CRD file holds it (not closed)."""
    # The C loader when PyYAML has it: the CRD files are ~1 MB and the pure-Python loader takes ~10 s.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """A jsonschema validator for the ray.io/v1 `kind` that rejects unknown fields (closed_schema)."""
    schema = closed_schema(crd_schema(kind))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate_object(obj: dict[str, Any]) -> None:
    """Validate one Kubernetes object: ray.io kinds against the KubeRay CRD, others strictly.

    Raises:
        jsonschema.ValidationError / kubernetes_validate.ValidationError: the object is invalid.
    """
    if obj["apiVersion"].startswith("ray.io/"):
        assert obj["apiVersion"] == "ray.io/v1", f"{obj['kind']}: use the storage version ray.io/v1"
        crd_validator(obj["kind"]).validate(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def kubectl() -> str:
    """Path of kubectl; FAILS the test (not skip) when it is missing: the machine image has it."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl not found on PATH: it is part of the machine image and renders the "
                    "Kustomize overlays; install kubectl (it bundles kustomize)")
    return path


@cache
def _kustomize(directory: Path) -> str:
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed: {done.stderr}"
    return done.stdout


def render_kustomization(name: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders for base/gpu/dev (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_kustomize(KUSTOMIZATIONS[name])) if doc]


def ray_pin() -> str:
    """The x.y.z of pyproject's `ray[tune]==x.y.z` requirement."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [m.group(1) for d in deps if (m := re.fullmatch(r"ray\[[^\]]*\]==(\d+\.\d+\.\d+)", d.replace(" ", "")))]
    return pin


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod template an object carries (workloads, RayCluster, RayJob)."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    spec = obj.get("spec", {})
    if kind in WORKLOAD_KINDS:
        yield f"{kind}/{name}", spec["template"]["spec"]
    if kind == "RayCluster":
        yield f"RayCluster/{name} head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"RayCluster/{name} {group['groupName']}", group["template"]["spec"]
    if kind == "RayJob" and "submitterPodTemplate" in spec:
        yield f"RayJob/{name} submitter", spec["submitterPodTemplate"]["spec"]


def _manifest_files() -> list[Path]:
    return sorted(MANIFESTS.rglob("*.yaml"))


def _load_file(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def _by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


# ---------------------------------------------------------------------------------------------
# The validators themselves can fail
# ---------------------------------------------------------------------------------------------


def test_kubernetes_validate_uses_a_current_kubernetes_version():
    assert Version(K8S_VERSION) >= Version("1.35"), f"kubernetes-validate only knows {K8S_VERSION}; upgrade it"


def test_closed_crd_schema_rejects_unknown_fields_the_raw_schema_accepts():
    cluster = _one(render_kustomization("base"), "RayCluster", "driftsweep")
    crd_validator("RayCluster").validate(cluster)
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpec"] = typo["spec"].pop("workerGroupSpecs")  # missing final s
    nested = copy.deepcopy(cluster)
    nested["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}  # singular
    raw = jsonschema.Draft7Validator(crd_schema("RayCluster"))
    for bad in (typo, nested):
        assert raw.is_valid(bad), "the raw CRD schema is expected to accept unknown fields"
        with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
            crd_validator("RayCluster").validate(bad)


def test_closed_schema_keeps_preserve_unknown_fields_open_and_maps_nullable():
    schema = closed_schema({"type": "object", "properties": {
        "open": {"type": "object", "properties": {"a": {"type": "string"}},
                 "x-kubernetes-preserve-unknown-fields": True},
        "shut": {"type": "object", "properties": {"a": {"type": "string", "nullable": True}}}}})
    validator = jsonschema.Draft7Validator(schema)
    assert validator.is_valid({"open": {"a": "x", "extra": 1}, "shut": {"a": None}})
    assert not validator.is_valid({"shut": {"a": "x", "extra": 1}})
    assert not validator.is_valid({"top": 1})


def test_core_validation_is_strict_about_unknown_fields():
    service = _one(render_kustomization("base"), "Service", "mlflow")
    validate_object(service)
    service["spec"]["selectr"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(service)


# ---------------------------------------------------------------------------------------------
# Files and rendered overlays
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_every_manifest_file_is_valid(path: Path):
    docs = _load_file(path)
    assert len(docs) == 1, f"{path.name}: one object (or one patch) per file, found {len(docs)} documents"
    (doc,) = docs
    if path.name == "kustomization.yaml":
        assert doc["kind"] == "Kustomization"
        referenced = [p["path"] for p in doc.get("patches", [])] + [r for r in doc.get("resources", [])]
        for ref in referenced:
            assert (path.parent / ref).exists(), f"{path}: references missing {ref}"
    elif isinstance(doc, list):
        # A JSON 6902 patch: well-formed ops, and used by its overlay (its effect is validated in the
        # rendered overlay below).
        for op in doc:
            assert op["op"] in ("add", "remove", "replace") and op["path"].startswith("/"), op
        kustomization = yaml.safe_load((path.parent / "kustomization.yaml").read_text())
        assert path.name in [p["path"] for p in kustomization.get("patches", [])], f"{path} is not used"
    else:
        validate_object(doc)
        stem = path.name.split(".")[0]
        suffix = FILE_SUFFIX[doc["kind"]]
        assert stem.endswith(suffix), f"{path.name}: name a {doc['kind']} file *{suffix}.yaml"


def test_base_resources_are_all_listed_in_the_kustomization():
    kustomization = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())
    on_disk = {p.name for p in (MANIFESTS / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_rendered_kustomization_is_valid(name: str):
    objects = render_kustomization(name)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["Namespace", "Service", "Service", "StatefulSet", "PersistentVolumeClaim",
                            "PersistentVolumeClaim", "Deployment", "RayCluster"]), kinds
    for obj in objects:
        validate_object(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "driftsweep", obj["metadata"]
    assert not _by_kind(objects, "Secret"), "secrets are created by hand (docs/kubernetes.md), never shipped"


# ---------------------------------------------------------------------------------------------
# Cross-references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_select_the_labels_their_workloads_carry(name: str):
    objects = render_kustomization(name)
    workloads = [o for o in objects if o["kind"] in WORKLOAD_KINDS]
    for service in _by_kind(objects, "Service"):
        selector = service["spec"]["selector"]
        matches = [w for w in workloads
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects {len(matches)} workloads"
        (workload,) = matches
        # The workload's own selector must pick its pods too (else the Deployment owns nothing).
        assert workload["spec"]["selector"]["matchLabels"].items() <= \
            workload["spec"]["template"]["metadata"]["labels"].items()
        port_names = {p["name"] for c in workload["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{service['metadata']['name']}: targetPort {port['targetPort']}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_mlflow_server_postgres_backend_and_served_artifacts_on_a_pvc(name: str):
    objects = render_kustomization(name)
    mlflow_service = _one(objects, "Service", "mlflow")
    assert mlflow_service["spec"].get("type", "ClusterIP") == "ClusterIP", "MLflow must not be exposed"
    deployment = _one(objects, "Deployment", "mlflow")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = dict(a.removeprefix("--").split("=", 1) if "=" in a else (a.removeprefix("--"), True)
                for a in container["args"])
    assert args.get("serve-artifacts") is True
    # Artifacts land on a PVC-backed mount.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    destination = args["artifacts-destination"]
    (mount,) = [p for p in mounts if destination == p or destination.startswith(p + "/")]
    claim = volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"]
    assert _one(objects, "PersistentVolumeClaim", claim)
    # Backend store: the postgres Service's name and port, no password in the URI.
    uri = args["backend-store-uri"]
    match = re.fullmatch(r"postgresql://(?P<user>[^:@/]+)@(?P<host>[^:/]+):(?P<port>\d+)/(?P<db>\w+)", uri)
    assert match, f"backend store {uri!r}: postgresql://user@host:port/db without a password"
    postgres_service = _one(objects, "Service", match["host"])
    assert int(match["port"]) in [p["port"] for p in postgres_service["spec"]["ports"]]
    statefulset = _one(objects, "StatefulSet", "postgres")
    assert statefulset["spec"]["serviceName"] == postgres_service["metadata"]["name"]
    pg_env = {e["name"]: e for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert pg_env["POSTGRES_USER"]["value"] == match["user"] and pg_env["POSTGRES_DB"]["value"] == match["db"]
    # Same Secret key on both sides.
    mlflow_env = {e["name"]: e for e in container["env"]}
    assert mlflow_env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == \
        pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    # PostgreSQL data on a claim from volumeClaimTemplates.
    claim_names = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    pg_mounts = {m["name"] for m in statefulset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert claim_names & pg_mounts


@pytest.mark.parametrize("name", OVERLAYS)
def test_mlflow_accepts_the_host_headers_of_its_service_and_port_forward(name: str):
    from mlflow.server.security_utils import is_allowed_host_header  # MLflow's own check

    objects = render_kustomization(name)
    service = _one(objects, "Service", "mlflow")
    ns, port = service["metadata"]["namespace"], service["spec"]["ports"][0]["port"]
    env = {e["name"]: e.get("value") for e in _one(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    allowed = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    for host in (f"mlflow.{ns}.svc.cluster.local:{port}", f"mlflow.{ns}:{port}", f"mlflow:{port}",
                 "localhost:5000", "127.0.0.1:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example.com:5000")


def test_mlflow_job_runners_are_off_so_the_server_fits_its_memory_limit():
    for name in OVERLAYS:
        deployment = _one(render_kustomization(name), "Deployment", "mlflow")
        env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


@pytest.mark.parametrize("name", OVERLAYS)
def test_probes_on_every_long_running_container(name: str):
    for workload in [o for o in render_kustomization(name) if o["kind"] in ("Deployment", "StatefulSet")]:
        for container in workload["spec"]["template"]["spec"]["containers"]:
            where = f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container and "livenessProbe" in container, where
            port_names = {p["name"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                http = container.get(probe, {}).get("httpGet")
                if http:
                    assert http["port"] in port_names, f"{where} {probe} port {http['port']}"


def _images(objects: list[dict[str, Any]], kinds: tuple[str, ...]) -> list[str]:
    return [c["image"] for o in objects if o["kind"] in kinds for _, pod in pod_specs(o) for c in pod["containers"]]


def test_ray_version_equals_the_pyproject_pin_in_manifests_and_dockerfile():
    pin = ray_pin()
    (base_from,) = re.findall(r"^FROM\s+(\S+)", (REPO / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(pin)}-py311-gpu", base_from), base_from
    template = _load_file(MANIFESTS / "templates" / "ray-job.template.yaml")[0]
    for name in KUSTOMIZATIONS:
        objects = render_kustomization(name) + [template]
        (cluster,) = _by_kind(objects, "RayCluster")
        assert cluster["spec"]["rayVersion"] == pin
        ray_images = _images(objects, ("RayCluster", "RayJob"))
        assert len(ray_images) == 3, ray_images  # head, workers, submitter
        driftsweep_images = [i for i in _images(objects, WORKLOAD_KINDS + ("RayCluster", "RayJob"))
                             if i.rsplit(":", 1)[0].rsplit("/", 1)[-1] == "driftsweep"]
        assert set(ray_images) <= set(driftsweep_images), "Ray pods run the image built from ./Dockerfile"
        for image in driftsweep_images:
            assert image.rsplit(":", 1)[1].endswith(f"-ray{pin}"), f"{image}: the tag must carry Ray {pin}"


def test_gpu_workers_ask_for_gpus_tolerate_the_taint_select_gpu_nodes_and_autoscale():
    (cluster,) = _by_kind(render_kustomization("gpu"), "RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    groups = cluster["spec"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            resources = container["resources"]
            gpus = resources["limits"].get("nvidia.com/gpu")
            assert gpus is not None and int(gpus) >= 1, f"{group['groupName']}: no GPU limit"
            assert resources["requests"].get("nvidia.com/gpu") == gpus, "GPU requests must equal limits"
        assert any(t["key"] == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in pod["tolerations"])
        assert pod["nodeSelector"], "GPU workers need a node selector"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head["limits"], "the head is a CPU pod"


def test_dev_overlay_is_cpu_only_and_runs_on_one_node():
    objects = render_kustomization("dev")
    for where, pod in [p for o in objects for p in pod_specs(o)]:
        for container in pod["containers"]:
            for section in ("requests", "limits"):
                assert "nvidia.com/gpu" not in container["resources"][section], where
        assert "nvidia.com/gpu" not in str(pod.get("tolerations", "")) and not pod.get("nodeSelector"), where
    (cluster,) = _by_kind(objects, "RayCluster")
    assert cluster["spec"]["workerGroupSpecs"][0]["minReplicas"] >= 1, "dev keeps one worker up"


@pytest.mark.parametrize("name", OVERLAYS)
def test_ray_pods_share_tune_storage_on_the_shared_claim(name: str):
    objects = render_kustomization(name)
    (cluster,) = _by_kind(objects, "RayCluster")
    claim = _one(objects, "PersistentVolumeClaim", "ray-shared")
    expected_mode = "ReadWriteMany" if name == "gpu" else "ReadWriteOnce"  # dev: one node
    assert claim["spec"]["accessModes"] == [expected_mode]
    for where, pod in pod_specs(cluster):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims.get(mounts.get("/shared")) == "ray-shared", f"{where}: /shared is not the shared claim"


def _all_pods() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in OVERLAYS:
        for obj in render_kustomization(name):
            for where, pod in pod_specs(obj):
                yield f"{name}: {where}", pod
    template = _load_file(MANIFESTS / "templates" / "ray-job.template.yaml")[0]
    yield from pod_specs(template)


def test_the_security_settings_hold_on_every_pod_and_container():
    pods = list(_all_pods())
    assert len(pods) == 2 * 4 + 1  # per overlay: mlflow, postgres, ray head, ray workers; + submitter
    for where, pod in pods:
        pod_ctx = pod.get("securityContext", {})
        assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True, where
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], f"{where}: hostPath volume"
        assert not [v for v in pod.get("volumes", []) if "secret" in v], f"{where}: secrets only via secretKeyRef"
        for container in _containers(pod):
            ctx = {**pod_ctx, **container.get("securityContext", {})}
            cwhere = f"{where}/{container['name']}"
            assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 1) != 0, f"{cwhere}: runs as root"
            assert ctx.get("allowPrivilegeEscalation") is False, f"{cwhere}: privilege escalation allowed"
            assert ctx.get("privileged", False) is False, f"{cwhere}: privileged"
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{cwhere}: capabilities not dropped"
            assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container.get("resources", {}).get(section, {})), \
                    f"{cwhere}: {section} must set cpu and memory"
            for env in container.get("env", []):
                if "valueFrom" in env:
                    assert set(env["valueFrom"]) <= {"secretKeyRef", "fieldRef", "configMapKeyRef"}, cwhere
                elif SECRET_NAME_HINT.search(env["name"]):
                    pytest.fail(f"{cwhere}: {env['name']} holds a literal value; use secretKeyRef")
            assert not [e for e in container.get("envFrom", []) if "secretRef" in e], f"{cwhere}: envFrom secret"


def test_the_injected_autoscaler_container_is_restricted_and_bounded():
    for name in OVERLAYS:
        (cluster,) = _by_kind(render_kustomization(name), "RayCluster")
        options = cluster["spec"]["autoscalerOptions"]
        ctx = options["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"] and ctx.get("privileged", False) is False
        assert {"cpu", "memory"} <= set(options["resources"]["requests"]) & set(options["resources"]["limits"])


def test_no_literal_password_in_any_manifest():
    pattern = re.compile(r"(password|passwd|secret|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/_-]{6,}", re.IGNORECASE)
    for path in _manifest_files():
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            assert not pattern.search(code), f"{path.name}: {line.strip()}"
            assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", code), f"{path.name}: credentials in a URI"


def test_namespace_enforces_the_restricted_pod_security_profile():
    (namespace,) = _by_kind(render_kustomization("gpu"), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"



def test_docs_and_smoke_script_create_the_secret_the_manifests_read():
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for obj in render_kustomization("gpu") for _, pod in pod_specs(obj) for c in _containers(pod)
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    assert len(refs) == 1, refs  # one Secret to create by hand
    ((secret, key),) = refs
    for path in (REPO / "docs" / "kubernetes.md", REPO / "scripts" / "k8s-smoke.sh"):
        text = path.read_text()
        assert re.search(rf"create secret generic {secret}\s*(\\\s*)?--from-literal={key}=", text), path.name


def test_smoke_script_is_valid_bash_and_runs_the_dev_overlay_and_the_quick_plan():
    script = REPO / "scripts" / "k8s-smoke.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert "apply -k manifests/overlays/dev" in text and (MANIFESTS / "overlays" / "dev").is_dir()
    assert "PLAN:-examples/quick.yaml" in text and (REPO / "examples" / "quick.yaml").is_file()
    assert "set -euo pipefail" in text
