"""Kubernetes submission: a plan becomes a ConfigMap (the plan) and a RayJob (its run) on KubeRay.

The RayJob targets the long-lived RayCluster of manifests/ by `clusterSelector` instead of embedding a
`rayClusterSpec`: sweeps then share the cluster's autoscaled GPU workers (no cold start per plan), and
the cluster spec lives in one place (manifests/base/ray-cluster.yaml + overlays) instead of also being
copied into Python. The RayJob's fields come from manifests/templates/ray-job.template.yaml.

How the plan reaches the driver: the submitter pod mounts the ConfigMap at /plans and runs
`ray job submit` with runtime_env working_dir=/plans, which uploads the directory to the cluster; the
driver (`driftsweep run <file>`) runs on the head node inside that uploaded directory. The plan is
rewritten for the cluster first: tracking.uri -> the in-cluster MLflow Service (a local sqlite path
cannot work across nodes), cluster.address -> auto (the cluster the job runs in), cluster.storage_path
-> the shared ReadWriteMany volume that every Ray pod mounts.

Names are <plan name>-<first 8 hex of sha256(plan text)>: submitting the same plan twice finds the
first RayJob instead of creating a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from orchestrator.errors import K8sError
from orchestrator.plan import load_plan, mask_uri, parse_plan

DEFAULT_NAMESPACE = "driftsweep"
# Must match manifests/base/mlflow-service.yaml (tests/test_k8s_submit.py cross-checks name and port).
MLFLOW_SERVICE_NAME = "mlflow"
MLFLOW_SERVICE_PORT = 5000
# Must match manifests/base/ray-cluster.yaml metadata.name and its /shared volume mount.
RAY_CLUSTER_NAME = "driftsweep"
SHARED_STORAGE_PATH = "/shared/ray-results"
PLAN_MOUNT_DIR = "/plans"
TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "manifests" / "templates" / "ray-job.template.yaml"

RAY_GROUP, RAY_VERSION = "ray.io", "v1"
# KubeRay rejects RayJob names longer than 47 characters (it appends suffixes to derive cluster and
# Service names) and names that are not DNS-1035 labels (lowercase letter first, then [a-z0-9-]).
MAX_RAYJOB_NAME_CHARS = 47
HASH_CHARS = 8
SUBMITTER_CONTAINER = "ray-job-submitter"
# Seconds: (connect, read) for every API call, so an unreachable server fails fast instead of hanging.
REQUEST_TIMEOUT_S = (5, 30)
_STACK_FIX = "apply the stack first: kubectl apply -k manifests/overlays/gpu (or overlays/dev)"
_KUBERAY_FIX = ("install the KubeRay operator: helm repo add kuberay https://ray-project.github.io/kuberay-helm/ "
                "&& helm install kuberay-operator kuberay/kuberay-operator")

_T = TypeVar("_T")


def mlflow_tracking_uri(namespace: str) -> str:
    """The in-cluster MLflow tracking URI for a namespace.

    Args:
        namespace: where the stack (and the RayJob) runs.

    Returns:
        http://<service>.<namespace>.svc.cluster.local:<port>.
    """
    return f"http://{MLFLOW_SERVICE_NAME}.{namespace}.svc.cluster.local:{MLFLOW_SERVICE_PORT}"


def submission_name(plan_name: str, plan_text: str) -> str:
    """The RayJob name for a plan: DNS-1035, at most 47 characters, stable for the same text.

    Args:
        plan_name: the plan's `name` (a slug that may hold . and _).
        plan_text: the plan file's text (hashed).

    Returns:
        "<slug>-<8 hex of sha256(plan_text)>", the slug lowercased, [._] -> "-", "p-" prefixed if it
        does not start with a letter, and truncated to fit.
    """
    digest = hashlib.sha256(plan_text.encode("utf-8")).hexdigest()[:HASH_CHARS]
    slug = re.sub(r"[^a-z0-9]+", "-", plan_name.lower()).strip("-")
    if not slug[:1].isalpha():
        slug = f"p-{slug}".rstrip("-")
    slug = slug[: MAX_RAYJOB_NAME_CHARS - HASH_CHARS - 1].rstrip("-")
    return f"{slug}-{digest}"


def _cluster_plan_text(plan_text: str, source: str, tracking_uri: str) -> str:
    """Rewrite a plan for the cluster (tracking.uri, cluster.address, cluster.storage_path) and revalidate."""
    data = yaml.safe_load(plan_text)
    data["tracking"] = {**(data.get("tracking") or {}), "uri": tracking_uri}
    data["cluster"] = {**(data.get("cluster") or {}),
                       "address": "auto",  # the Ray job driver runs on the head: join that cluster
                       "storage_path": SHARED_STORAGE_PATH}
    header = (f"# Rendered by driftsweep for Kubernetes from {Path(source).name}: tracking.uri, "
              "cluster.address and cluster.storage_path point at the cluster.\n")
    text = header + yaml.safe_dump(data, sort_keys=False)
    parse_plan(text, source=f"{source} (rendered for the cluster)")
    return text


def _load_template() -> dict[str, Any]:
    try:
        return yaml.safe_load(TEMPLATE_PATH.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise K8sError(f"RayJob template {TEMPLATE_PATH} not found; run driftsweep from a source checkout "
                       "installed with `pip install -e .` (the template ships in manifests/)") from None


def render_submission(plan_path: str | Path, namespace: str = DEFAULT_NAMESPACE,
                      image: str | None = None) -> list[dict[str, Any]]:
    """The objects a submission creates: a ConfigMap holding the plan and a RayJob that runs it.

    Args:
        plan_path: the plan file (validated with load_plan).
        namespace: the namespace of the driftsweep stack (RayCluster, MLflow).
        image: the submitter image; None = the template's (the image built from ./Dockerfile).

    Returns:
        [ConfigMap, RayJob] as plain dicts (apiVersion/kind/metadata/...), ready for YAML or the API.

    Raises:
        PlanError: the plan is invalid.
        K8sError: the RayJob template is missing.
    """
    plan = load_plan(plan_path)
    plan_text = Path(plan_path).read_text(encoding="utf-8")
    name = submission_name(plan.name, plan_text)
    # The file name is the ConfigMap key and the entrypoint argument: keep it a valid key.
    file_key = re.sub(r"[^-._a-zA-Z0-9]", "-", Path(plan_path).name)
    tracking_uri = mlflow_tracking_uri(namespace)
    annotations = {
        "driftsweep.io/plan-name": plan.name,
        "driftsweep.io/plan-file": str(plan_path),
        "driftsweep.io/plan-sha256": hashlib.sha256(plan_text.encode("utf-8")).hexdigest(),
    }
    if plan.tracking.uri:
        annotations["driftsweep.io/plan-tracking-uri-replaced"] = mask_uri(plan.tracking.uri)

    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{name}-plan",
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "driftsweep-plan", "app.kubernetes.io/part-of": "driftsweep",
                       "driftsweep.io/rayjob": name},
            "annotations": annotations,
        },
        "immutable": True,  # the name carries the plan's hash: its content never changes
        "data": {file_key: _cluster_plan_text(plan_text, str(plan_path), tracking_uri)},
    }

    ray_job = _load_template()
    meta = ray_job["metadata"]
    meta.update(name=name, namespace=namespace, annotations=annotations)
    meta["labels"]["driftsweep.io/rayjob"] = name
    spec = ray_job["spec"]
    spec["clusterSelector"] = {"ray.io/cluster": RAY_CLUSTER_NAME}
    spec["entrypoint"] = f"driftsweep run {shlex.quote(file_key)}"
    spec["runtimeEnvYAML"] = yaml.safe_dump(
        {"working_dir": PLAN_MOUNT_DIR, "env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}}, sort_keys=True)
    pod = spec["submitterPodTemplate"]["spec"]
    container = pod["containers"][0]
    if image is not None:
        container["image"] = image
    container["volumeMounts"][0].update(mountPath=f"{PLAN_MOUNT_DIR}/{file_key}", subPath=file_key)
    pod["volumes"][0]["configMap"]["name"] = config_map["metadata"]["name"]
    return [config_map, ray_job]


class _BlockStyleDumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings (the plan, runtimeEnvYAML) as readable | blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStyleDumper.add_representer(str, _str_representer)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """YAML documents (---separated) for `kubectl apply -f -`, multi-line strings as | blocks.

    Args:
        objects: e.g. render_submission's result.

    Returns:
        The YAML text.
    """
    return yaml.dump_all(objects, Dumper=_BlockStyleDumper, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# API access
# ---------------------------------------------------------------------------------------------


class _Api:
    """The three API groups a submission uses, on one ApiClient (kubeconfig context or in-cluster)."""

    def __init__(self, context: str | None):
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            # KUBECONFIG is read now (the client reads it once, at import) so that it can change per call.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), context=context,
                                    client_configuration=configuration, persist_config=False)
        except config.ConfigException as kube_exc:
            if context is not None:
                raise K8sError(f"kubeconfig context {context!r} unusable ({_one_line(kube_exc)}); "
                               "list contexts with `kubectl config get-contexts`") from None
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                raise K8sError("no Kubernetes configuration: no kubeconfig (KUBECONFIG or ~/.kube/config) and "
                               "not running in a pod; point KUBECONFIG at your cluster's config") from None
        configuration.retries = 1  # urllib3 retries: connection refused should fail in about a second
        self.host = configuration.host
        self.api_client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _status_body(exc: Any) -> dict[str, Any]:
    """The Kubernetes Status object of an ApiException ({} when the body is not JSON)."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _call(api: _Api, action: str, namespace: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run one API call; turn transport errors and 401/403 into K8sError (other statuses re-raise).

    Args:
        api: the clients.
        action: what is being done, for the message ("create RayJob x").
        namespace: for the RBAC hint.
        fn: the client method.

    Returns:
        The method's result.

    Raises:
        K8sError: the server is unreachable, or rejected the credentials or the permission.
        kubernetes.client.ApiException: any other status (callers handle 404 and 409 in context).
    """
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, _request_timeout=REQUEST_TIMEOUT_S, **kwargs)
    except HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise K8sError(f"cannot reach the Kubernetes API server at {api.host} ({action}): {_one_line(reason)}; "
                       "check that the cluster is up and `kubectl cluster-info` works with this context") from None
    except ApiException as exc:
        message = _one_line(_status_body(exc).get("message") or exc.reason)
        if exc.status == 401:
            raise K8sError(f"unauthorized ({action}): {message}; your kubeconfig credentials were rejected, "
                           "refresh them (e.g. your cloud's get-credentials command)") from None
        if exc.status == 403:
            raise K8sError(f"forbidden ({action}): {message}; ask your cluster admin for a Role allowing it in "
                           f"namespace {namespace} (see what you may do: kubectl auth can-i --list "
                           f"-n {namespace})") from None
        raise


def _api_error(exc: Any, action: str) -> K8sError:
    """A K8sError for an API status no caller handles specifically."""
    message = _one_line(_status_body(exc).get("message") or exc.reason)
    return K8sError(f"Kubernetes API error {exc.status} ({action}): {message}")


def _kuberay_missing(api: _Api, kind: str) -> K8sError:
    return K8sError(f"KubeRay is not installed (no {RAY_GROUP}/{RAY_VERSION} {kind} resource type on {api.host}); "
                    f"{_KUBERAY_FIX}")


def _is_missing_resource_type(exc: Any) -> bool:
    """True when a 404 means the resource type is unknown (CRD not installed), not a missing object.

    The API server answers "the server could not find the requested resource" with empty details for
    an unknown type, and details.name = the object's name for a missing object.
    """
    return exc.status == 404 and not _status_body(exc).get("details", {}).get("name")


def _get_ray_cluster(api: _Api, namespace: str) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    action = f"read RayCluster {RAY_CLUSTER_NAME} in namespace {namespace}"
    try:
        return _call(api, action, namespace, api.custom.get_namespaced_custom_object,
                     RAY_GROUP, RAY_VERSION, namespace, "rayclusters", RAY_CLUSTER_NAME)
    except ApiException as exc:
        if _is_missing_resource_type(exc):
            raise _kuberay_missing(api, "RayCluster") from None
        if exc.status == 404:
            raise K8sError(f"RayCluster {RAY_CLUSTER_NAME} not found in namespace {namespace}; "
                           f"{_STACK_FIX}") from None
        raise _api_error(exc, action) from None


def _is_subset(wanted: Any, actual: Any) -> bool:
    """True when every field of `wanted` is in `actual` with the same value (server defaults ignored)."""
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(k in actual and _is_subset(v, actual[k]) for k, v in wanted.items())
    if isinstance(wanted, list):
        return (isinstance(actual, list) and len(wanted) == len(actual)
                and all(_is_subset(w, a) for w, a in zip(wanted, actual)))
    return wanted == actual


def _create_config_map(api: _Api, body: dict[str, Any], namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    name = body["metadata"]["name"]
    action = f"create ConfigMap {name}"
    try:
        _call(api, action, namespace, api.core.create_namespaced_config_map, namespace,
              client.V1ConfigMap.from_dict(body))
    except ApiException as exc:
        if exc.status != 409:
            raise _api_error(exc, action) from None
        existing = _call(api, f"read ConfigMap {name}", namespace, api.core.read_namespaced_config_map,
                         name, namespace)
        if (existing.data or {}) != body["data"]:
            raise K8sError(f"ConfigMap {name} exists in namespace {namespace} with other content; delete it "
                           f"(kubectl -n {namespace} delete configmap {name}) and submit again") from None


def _create_ray_job(api: _Api, body: dict[str, Any], namespace: str) -> dict[str, Any] | None:
    """Create the RayJob; None when an identical one already exists."""
    from kubernetes.client.exceptions import ApiException

    name = body["metadata"]["name"]
    action = f"create RayJob {name}"
    try:
        return _call(api, action, namespace, api.custom.create_namespaced_custom_object,
                     RAY_GROUP, RAY_VERSION, namespace, "rayjobs", body)
    except ApiException as exc:
        if _is_missing_resource_type(exc):
            raise _kuberay_missing(api, "RayJob") from None
        if exc.status != 409:
            raise _api_error(exc, action) from None
    existing = _call(api, f"read RayJob {name}", namespace, api.custom.get_namespaced_custom_object,
                     RAY_GROUP, RAY_VERSION, namespace, "rayjobs", name)
    if not _is_subset(body["spec"], existing.get("spec", {})):
        raise K8sError(f"RayJob {name} exists in namespace {namespace} with a different spec (another image?); "
                       f"delete it (kubectl -n {namespace} delete rayjob {name}) and submit again")
    return None


def submit(plan_path: str | Path, namespace: str = DEFAULT_NAMESPACE, context: str | None = None,
           image: str | None = None) -> str:
    """Create the plan's ConfigMap and RayJob (render_submission) through the Kubernetes API.

    Checks first that the RayCluster exists (a RayJob whose clusterSelector matches nothing would wait
    forever). The submitter image defaults to the cluster head's image, as KubeRay does for RayJobs
    that bring their own cluster. The ConfigMap gets the RayJob as owner, so deleting the RayJob
    deletes it.

    Args:
        plan_path: the plan file.
        namespace: the namespace of the driftsweep stack.
        context: kubeconfig context; None = the current context, else the in-cluster service account.
        image: the submitter image; None = the RayCluster head's image.

    Returns:
        A one-line message: what was created (or that this plan was already submitted) and what next.

    Raises:
        PlanError: the plan is invalid.
        K8sError: no cluster configuration, unreachable server, KubeRay not installed, RayCluster
            missing, forbidden, or a conflicting object of the same name.
    """
    api = _Api(context)
    cluster = _get_ray_cluster(api, namespace)
    if image is None:
        image = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    config_map, ray_job = render_submission(plan_path, namespace=namespace, image=image)
    name = ray_job["metadata"]["name"]
    follow = f"status: driftsweep k8s status {name} -n {namespace}; logs: driftsweep logs {name} -n {namespace}"
    _create_config_map(api, config_map, namespace)
    created = _create_ray_job(api, ray_job, namespace)
    if created is None:
        return f"RayJob {name} was already submitted for this plan in namespace {namespace} (not duplicated); {follow}"
    owner = {"apiVersion": f"{RAY_GROUP}/{RAY_VERSION}", "kind": "RayJob", "name": name,
             "uid": created["metadata"]["uid"]}
    cm_name = config_map["metadata"]["name"]
    # A JSON merge patch: the client's default content type for a dict body is JSON Patch, which the
    # API server rejects (it expects a list of operations).
    _call(api, f"set the owner of ConfigMap {cm_name}", namespace, api.core.patch_namespaced_config_map,
          cm_name, namespace, {"metadata": {"ownerReferences": [owner]}},
          _content_type="application/merge-patch+json")
    return f"submitted RayJob {name} in namespace {namespace} (plan {plan_path}); {follow}"


def _get_ray_job(api: _Api, name: str, namespace: str) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    action = f"read RayJob {name}"
    try:
        return _call(api, action, namespace, api.custom.get_namespaced_custom_object,
                     RAY_GROUP, RAY_VERSION, namespace, "rayjobs", name)
    except ApiException as exc:
        if _is_missing_resource_type(exc):
            raise _kuberay_missing(api, "RayJob") from None
        if exc.status == 404:
            raise K8sError(f"RayJob {name} not found in namespace {namespace}; list them with "
                           f"kubectl -n {namespace} get rayjobs") from None
        raise _api_error(exc, action) from None


def job_status(name: str, namespace: str = DEFAULT_NAMESPACE, context: str | None = None) -> dict[str, Any]:
    """The RayJob's status as KubeRay reports it.

    Args:
        name: the RayJob name (printed by submit).
        namespace: its namespace.
        context: kubeconfig context (None = current, else in-cluster).

    Returns:
        {name, namespace, job_status (Ray: PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED, "" before submit),
        deployment_status (KubeRay: Initializing/Running/Complete/Failed/...), message, reason,
        start_time, end_time, ray_cluster, job_id}; missing values are "".

    Raises:
        K8sError: API errors, or no such RayJob.
    """
    status = _get_ray_job(_Api(context), name, namespace).get("status") or {}
    fields = {"job_status": "jobStatus", "deployment_status": "jobDeploymentStatus", "message": "message",
              "reason": "reason", "start_time": "startTime", "end_time": "endTime",
              "ray_cluster": "rayClusterName", "job_id": "jobId"}
    return {"name": name, "namespace": namespace, **{k: status.get(v) or "" for k, v in fields.items()}}


def job_logs(name: str, namespace: str = DEFAULT_NAMESPACE, context: str | None = None) -> str:
    """The logs of the RayJob's submitter pod (it follows the Ray job, so they hold the driver's output).

    Args:
        name: the RayJob name.
        namespace: its namespace.
        context: kubeconfig context (None = current, else in-cluster).

    Returns:
        The newest submitter pod's log text.

    Raises:
        K8sError: API errors, or no submitter pod yet (the cluster is still starting).
    """
    from kubernetes.client.exceptions import ApiException

    api = _Api(context)
    _get_ray_job(api, name, namespace)  # a clear "not found" before looking for pods
    # KubeRay names the submitter Job after the RayJob; the Job controller labels its pods job-name=<job>.
    pods = _call(api, f"list the pods of RayJob {name}", namespace, api.core.list_namespaced_pod,
                 namespace, label_selector=f"job-name={name}").items
    if not pods:
        raise K8sError(f"RayJob {name} has no submitter pod yet (KubeRay creates it when the RayCluster is "
                       f"ready); check driftsweep k8s status {name} -n {namespace} and retry")
    pod = max(pods, key=lambda p: str(p.metadata.creation_timestamp or ""))  # same-zone ISO text sorts by time
    action = f"read the logs of pod {pod.metadata.name}"
    try:
        return _call(api, action, namespace, api.core.read_namespaced_pod_log, pod.metadata.name, namespace,
                     container=SUBMITTER_CONTAINER)
    except ApiException as exc:
        raise _api_error(exc, action) from None
