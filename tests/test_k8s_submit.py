"""Kubernetes submission: rendered objects are valid and agree with the manifests; submit/status/logs
talk to a STAND-IN for the Kubernetes API server.

The stand-in is a small HTTP server on 127.0.0.1 that answers the REST calls the real `kubernetes`
client makes (so the client's own serialization is exercised), keeps created objects in memory like
an API server (201 on create, 409 AlreadyExists, 404 NotFound with the server's Status bodies, merge
patches) and records every request with its exact JSON body. Error paths: KubeRay CRDs missing (404
without object details), RayCluster missing, 403 forbidden, 409 conflicts, connection refused, no
kubeconfig.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import typer
import yaml
from typer.testing import CliRunner

from orchestrator import k8s
from orchestrator.errors import K8sError, PlanError
from orchestrator.k8s_cli import register
from orchestrator.plan import parse_plan
from test_manifests import REPO, pod_specs, render_kustomization, validate_object

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
QUICK = REPO / "examples" / "quick.yaml"
HEAD_IMAGE = "registry.example/team/driftsweep:0.1.0-ray2.60.0"


def _plan_file(tmp_path: Path, text: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL_PLAN = "name: k8s_probe.v1\naxes:\n  kernel: [laplace, gaussian]\ntracking:\n  uri: sqlite:///mlflow.db\n"


# ---------------------------------------------------------------------------------------------
# render_submission
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", EXAMPLES, ids=lambda p: p.name)
def test_every_example_plan_renders_to_valid_objects(plan: Path):
    objects = k8s.render_submission(plan, namespace="team-a")
    assert [o["kind"] for o in objects] == ["ConfigMap", "RayJob"]
    for obj in objects:
        validate_object(obj)  # ConfigMap: kubernetes-validate strict; RayJob: the KubeRay CRD, closed
        assert obj["metadata"]["namespace"] == "team-a"


def test_rendered_ray_job_agrees_with_the_manifests_and_the_config_map(tmp_path):
    config_map, ray_job = k8s.render_submission(_plan_file(tmp_path, MINIMAL_PLAN, "abl.yaml"))
    base = render_kustomization("base")
    (service,) = [o for o in base if o["kind"] == "Service" and o["metadata"]["name"] == "mlflow"]
    (cluster,) = [o for o in base if o["kind"] == "RayCluster"]
    ns = cluster["metadata"]["namespace"]
    assert k8s.DEFAULT_NAMESPACE == ns == ray_job["metadata"]["namespace"]
    # The tracking URI names the MLflow Service and its port (from the manifests, not from k8s.py).
    expected_uri = f"http://{service['metadata']['name']}.{ns}.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    runtime_env = yaml.safe_load(ray_job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == expected_uri
    # The plan the driver reads: tracking overridden (the local sqlite path is gone), the cluster's Ray,
    # Tune state on the shared claim mounted by every Ray pod.
    ((key, text),) = config_map["data"].items()
    plan = parse_plan(text, source=key)
    assert plan.tracking.uri == expected_uri and "sqlite" not in text
    assert plan.cluster.address == "auto"
    for where, pod in pod_specs(cluster):
        mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
        assert any(plan.cluster.storage_path.startswith(m + "/") for m in mounts
                   if m != "/tmp/ray"), f"{where}: {plan.cluster.storage_path} is not on a shared mount"
    assert plan.name == "k8s_probe.v1" and list(plan.axes) == ["kernel"]
    # Entrypoint: `driftsweep run <key>` inside working_dir, where the submitter mounts the ConfigMap key.
    assert shlex.split(ray_job["spec"]["entrypoint"]) == ["driftsweep", "run", key]
    submitter = ray_job["spec"]["submitterPodTemplate"]["spec"]
    (mount,) = submitter["containers"][0]["volumeMounts"]
    assert mount["mountPath"] == f"{runtime_env['working_dir']}/{key}" and mount["subPath"] == key
    (volume,) = [v for v in submitter["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    # The RayJob runs on the manifests' RayCluster.
    assert ray_job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in ray_job["spec"]


def test_names_are_dns_labels_stable_for_the_same_plan_and_differ_for_another(tmp_path):
    first = k8s.render_submission(_plan_file(tmp_path, MINIMAL_PLAN, "a.yaml"))
    again = k8s.render_submission(_plan_file(tmp_path, MINIMAL_PLAN, "a.yaml"))
    assert first == again
    name = first[1]["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47
    assert name.startswith("k8s-probe-v1-")
    other = k8s.render_submission(_plan_file(tmp_path, MINIMAL_PLAN.replace("gaussian", "cauchy"), "b.yaml"))
    assert other[1]["metadata"]["name"] != name
    assert other[0]["metadata"]["name"] != first[0]["metadata"]["name"]


def test_long_and_digit_first_plan_names_still_give_valid_rayjob_names(tmp_path):
    for plan_name in ("9lives", "x" * 63, "a." + "b_" * 30):
        text = MINIMAL_PLAN.replace("k8s_probe.v1", plan_name)
        name = k8s.render_submission(_plan_file(tmp_path, text))[1]["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47, name


def test_render_uses_the_given_image_and_namespace_everywhere(tmp_path):
    config_map, ray_job = k8s.render_submission(_plan_file(tmp_path, MINIMAL_PLAN), namespace="ml", image="img:1")
    assert ray_job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == "img:1"
    assert "mlflow.ml.svc.cluster.local" in ray_job["spec"]["runtimeEnvYAML"]
    assert "mlflow.ml.svc.cluster.local" in next(iter(config_map["data"].values()))


def test_render_rejects_an_invalid_plan_with_the_plan_error(tmp_path):
    with pytest.raises(PlanError, match="axes"):
        k8s.render_submission(_plan_file(tmp_path, "name: x\naxes: {}\n"))


def test_to_yaml_round_trips_and_keeps_the_plan_readable(tmp_path):
    objects = k8s.render_submission(_plan_file(tmp_path, MINIMAL_PLAN))
    text = k8s.to_yaml(objects)
    assert list(yaml.safe_load_all(text)) == objects
    assert "plan.yaml: |" in text  # the plan as a block, not an escaped one-liner


# ---------------------------------------------------------------------------------------------
# The stand-in API server
# ---------------------------------------------------------------------------------------------

_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
                   r"(?:/(?P<name>[^/]+))?(?P<log>/log)?$")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lowercased
    body: Any


@dataclass
class StandInApiServer:
    """In-memory stand-in for the Kubernetes API server (see the module docstring)."""

    kuberay_installed: bool = True
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    forbidden: set[tuple[str, str]] = field(default_factory=set)
    requests: list[Recorded] = field(default_factory=list)

    def bodies(self, method: str, path: str) -> list[Any]:
        """The JSON bodies received for (method, path)."""
        return [r.body for r in self.requests if r.method == method and r.path == path]

    @staticmethod
    def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> tuple[int, Any]:
        return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "details": details or {}, "code": code}

    def handle(self, rec: Recorded) -> tuple[int, Any]:
        if rec.path.startswith("/apis/ray.io/") and not self.kuberay_installed:
            return self.status(404, "NotFound", "the server could not find the requested resource")
        match = _PATH.match(rec.path)
        if match is None:
            return self.status(404, "NotFound", "the server could not find the requested resource")
        plural, name, group = match["plural"], match["name"], match["group"] or ""
        if (rec.method, rec.path) in self.forbidden:
            verb = {"POST": "create", "GET": "get", "PATCH": "patch"}[rec.method]
            return self.status(403, "Forbidden", f'{plural}.{group} is forbidden: User "standin" cannot {verb} '
                               f'resource "{plural}" in API group "{group}" in the namespace "{match["ns"]}"')
        details = {"name": name, "group": group, "kind": plural}
        if rec.method == "POST" and name is None:
            body = rec.body
            if not isinstance(body, dict) or "apiVersion" not in body or "kind" not in body:
                return self.status(400, "BadRequest", "object has no apiVersion/kind")
            item = f"{rec.path}/{body['metadata']['name']}"
            if body["metadata"].get("namespace", match["ns"]) != match["ns"]:
                return self.status(400, "BadRequest", "the namespace of the object does not match the request")
            if item in self.objects:
                details["name"] = body["metadata"]["name"]
                return self.status(409, "AlreadyExists", f'{plural}.{group} "{details["name"]}" already exists',
                                   details)
            stored = copy.deepcopy(body)
            stored["metadata"].update(uid=f"uid-{len(self.objects) + 1}", resourceVersion="1",
                                      creationTimestamp="2026-11-24T09:00:00Z", namespace=match["ns"])
            self.objects[item] = stored
            return 201, stored
        if rec.method == "GET" and match["log"]:
            return (200, self.logs[rec.path.removesuffix("/log")]) if rec.path.removesuffix("/log") in self.logs \
                else self.status(404, "NotFound", f'pods "{name}" not found', details)
        if rec.method == "GET" and name is None:
            wanted = dict(kv.split("=", 1) for kv in rec.query.get("labelSelector", [""])[0].split(",") if kv)
            items = [o for path, o in self.objects.items() if path.rsplit("/", 1)[0] == rec.path
                     and wanted.items() <= o["metadata"].get("labels", {}).items()]
            return 200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items}
        if name is not None and rec.path not in self.objects:
            return self.status(404, "NotFound", f'{plural}.{group} "{name}" not found', details)
        if rec.method == "GET":
            return 200, self.objects[rec.path]
        if rec.method == "PATCH":
            content_type = rec.headers.get("content-type", "")
            if content_type.startswith("application/json-patch+json") and not isinstance(rec.body, list):
                return self.status(400, "BadRequest", "json patch must be a list of operations")
            if not content_type.startswith("application/merge-patch+json"):
                return self.status(415, "UnsupportedMediaType", f"unsupported patch type {content_type}")
            self.objects[rec.path] = _merge_patch(self.objects[rec.path], rec.body)
            return 200, self.objects[rec.path]
        return self.status(405, "MethodNotAllowed", rec.method)


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


class _Handler(BaseHTTPRequestHandler):
    def _serve(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        rec = Recorded(self.command, parts.path, parse_qs(parts.query), {k.lower(): v for k, v in self.headers.items()},
                       json.loads(raw) if raw else None)
        standin: StandInApiServer = self.server.standin  # type: ignore[attr-defined]
        standin.requests.append(rec)
        code, body = standin.handle(rec)
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_kubeconfig(path: Path, servers: dict[str, str], current: str) -> Path:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": current, "preferences": {},
        "clusters": [{"name": c, "cluster": {"server": url}} for c, url in servers.items()],
        "users": [{"name": "standin-user", "user": {"token": "standin-token"}}],
        "contexts": [{"name": c, "context": {"cluster": c, "user": "standin-user"}} for c in servers],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """A running stand-in API server with the driftsweep RayCluster, and KUBECONFIG pointing at it."""
    server = StandInApiServer()
    server.objects[f"/apis/ray.io/v1/namespaces/{k8s.DEFAULT_NAMESPACE}/rayclusters/{k8s.RAY_CLUSTER_NAME}"] = {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": k8s.RAY_CLUSTER_NAME, "namespace": k8s.DEFAULT_NAMESPACE, "uid": "uid-cluster"},
        "spec": {"headGroupSpec": {"template": {"spec": {"containers": [{"name": "ray-head", "image": HEAD_IMAGE}]}}}},
    }
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.standin = server  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    kubeconfig = _write_kubeconfig(tmp_path / "kubeconfig", {
        "standin": f"http://127.0.0.1:{httpd.server_address[1]}",
        "nothing-listens": f"http://127.0.0.1:{_closed_port()}",
    }, current="standin")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield server
    httpd.shutdown()
    httpd.server_close()


NS_PATH = f"/api/v1/namespaces/{k8s.DEFAULT_NAMESPACE}"
RAY_PATH = f"/apis/ray.io/v1/namespaces/{k8s.DEFAULT_NAMESPACE}"


def test_submit_to_standin_sends_exactly_the_rendered_objects(standin, tmp_path):
    plan = _plan_file(tmp_path, MINIMAL_PLAN)
    config_map, ray_job = k8s.render_submission(plan, image=HEAD_IMAGE)  # submit defaults to the head's image
    name = ray_job["metadata"]["name"]
    message = k8s.submit(plan)
    assert message.startswith(f"submitted RayJob {name} in namespace {k8s.DEFAULT_NAMESPACE}")
    assert f"driftsweep logs {name}" in message
    assert standin.bodies("POST", f"{NS_PATH}/configmaps") == [config_map]
    assert standin.bodies("POST", f"{RAY_PATH}/rayjobs") == [ray_job]
    # The ConfigMap is owned by the created RayJob (merge patch with the uid the server assigned).
    uid = standin.objects[f"{RAY_PATH}/rayjobs/{name}"]["metadata"]["uid"]
    (patch,) = standin.bodies("PATCH", f"{NS_PATH}/configmaps/{name}-plan")
    assert patch == {"metadata": {"ownerReferences": [
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": name, "uid": uid}]}}
    assert standin.objects[f"{NS_PATH}/configmaps/{name}-plan"]["metadata"]["ownerReferences"][0]["uid"] == uid
    # The kubeconfig's credentials were used.
    assert {r.headers.get("authorization") for r in standin.requests} == {"Bearer standin-token"}


def test_submit_the_same_plan_twice_to_standin_says_already_submitted(standin, tmp_path):
    plan = _plan_file(tmp_path, MINIMAL_PLAN)
    k8s.submit(plan)
    message = k8s.submit(plan)
    name = k8s.render_submission(plan)[1]["metadata"]["name"]
    assert f"RayJob {name} was already submitted" in message and "not duplicated" in message
    assert len([p for p in standin.objects if "/rayjobs/" in p]) == 1
    assert len(standin.bodies("PATCH", f"{NS_PATH}/configmaps/{name}-plan")) == 1


def test_submit_to_standin_rejects_a_same_named_job_with_another_spec(standin, tmp_path):
    plan = _plan_file(tmp_path, MINIMAL_PLAN)
    k8s.submit(plan)
    with pytest.raises(K8sError, match=r"different spec .*kubectl -n driftsweep delete rayjob"):
        k8s.submit(plan, image="other:1")


def test_submit_to_standin_rejects_a_same_named_config_map_with_other_content(standin, tmp_path):
    plan = _plan_file(tmp_path, MINIMAL_PLAN)
    config_map = k8s.render_submission(plan)[0]
    stale = {**config_map, "data": {"plan.yaml": "name: stale\n"}}
    standin.objects[f"{NS_PATH}/configmaps/{config_map['metadata']['name']}"] = stale
    with pytest.raises(K8sError, match="other content"):
        k8s.submit(plan)
    assert not standin.bodies("POST", f"{RAY_PATH}/rayjobs")


def test_submit_to_standin_without_kuberay_says_install_the_operator(standin, tmp_path):
    standin.kuberay_installed = False
    with pytest.raises(K8sError, match=r"KubeRay is not installed.*helm install kuberay-operator") as err:
        k8s.submit(_plan_file(tmp_path, MINIMAL_PLAN))
    assert "\n" not in str(err.value)
    assert not standin.bodies("POST", f"{NS_PATH}/configmaps")  # nothing half-created


def test_submit_to_standin_without_the_ray_cluster_says_apply_the_manifests(standin, tmp_path):
    with pytest.raises(K8sError, match=r"RayCluster driftsweep not found in namespace other.*kubectl apply -k"):
        k8s.submit(_plan_file(tmp_path, MINIMAL_PLAN), namespace="other")


def test_submit_to_standin_forbidden_gives_the_rbac_fix(standin, tmp_path):
    standin.forbidden.add(("POST", f"{RAY_PATH}/rayjobs"))
    with pytest.raises(K8sError, match=r"^forbidden \(create RayJob .*cannot create.*kubectl auth can-i"):
        k8s.submit(_plan_file(tmp_path, MINIMAL_PLAN))


def test_submit_with_the_standin_kubeconfig_context_that_refuses_connections(standin, tmp_path):
    start = time.monotonic()
    with pytest.raises(K8sError, match=r"cannot reach the Kubernetes API server at http://127\.0\.0\.1:\d+"):
        k8s.submit(_plan_file(tmp_path, MINIMAL_PLAN), context="nothing-listens")
    assert time.monotonic() - start < 20, "an unreachable server must fail fast"
    assert standin.requests == []


def test_unknown_context_and_missing_kubeconfig_are_one_line_errors(standin, tmp_path, monkeypatch):
    plan = _plan_file(tmp_path, MINIMAL_PLAN)
    with pytest.raises(K8sError, match=r"context 'nope' unusable.*kubectl config get-contexts"):
        k8s.submit(plan, context="nope")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(K8sError, match=r"no Kubernetes configuration.*KUBECONFIG"):
        k8s.job_status("x")


def _with_status(standin: StandInApiServer, name: str, status: dict[str, Any]) -> None:
    standin.objects[f"{RAY_PATH}/rayjobs/{name}"] = {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name, "namespace": "driftsweep"},
        "spec": {}, "status": status}


def test_job_status_from_standin_reads_the_rayjob_status(standin):
    _with_status(standin, "quick-0123abcd", {
        "jobStatus": "RUNNING", "jobDeploymentStatus": "Running", "startTime": "2026-11-24T09:01:00Z",
        "rayClusterName": "driftsweep", "jobId": "quick-0123abcd-xyz", "message": "job is running"})
    status = k8s.job_status("quick-0123abcd")
    assert status == {"name": "quick-0123abcd", "namespace": "driftsweep", "job_status": "RUNNING",
                      "deployment_status": "Running", "message": "job is running", "reason": "",
                      "start_time": "2026-11-24T09:01:00Z", "end_time": "", "ray_cluster": "driftsweep",
                      "job_id": "quick-0123abcd-xyz"}
    with pytest.raises(K8sError, match=r"RayJob missing not found in namespace driftsweep.*get rayjobs"):
        k8s.job_status("missing")


def _add_pod(standin: StandInApiServer, pod: str, job: str, created: str, log: str) -> None:
    standin.objects[f"{NS_PATH}/pods/{pod}"] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": "driftsweep", "labels": {"job-name": job},
                     "creationTimestamp": created},
        "spec": {"containers": [{"name": "ray-job-submitter", "image": HEAD_IMAGE}]}}
    standin.logs[f"{NS_PATH}/pods/{pod}"] = log


def test_job_logs_from_standin_reads_the_newest_submitter_pod(standin):
    _with_status(standin, "quick-0123abcd", {"jobStatus": "RUNNING"})
    _add_pod(standin, "quick-0123abcd-old", "quick-0123abcd", "2026-11-24T09:00:00Z", "first attempt\n")
    _add_pod(standin, "quick-0123abcd-new", "quick-0123abcd", "2026-11-24T09:05:00Z", "trial t0001 swd=0.1\n")
    _add_pod(standin, "other-pod", "other-job", "2026-11-24T09:09:00Z", "not ours\n")
    assert k8s.job_logs("quick-0123abcd") == "trial t0001 swd=0.1\n"
    (listing,) = [r for r in standin.requests if r.path == f"{NS_PATH}/pods"]
    assert listing.query["labelSelector"] == ["job-name=quick-0123abcd"]
    (read,) = [r for r in standin.requests if r.path.endswith("/log")]
    assert read.query["container"] == ["ray-job-submitter"]


def test_job_logs_before_the_submitter_exists_says_wait(standin):
    _with_status(standin, "quick-0123abcd", {"jobDeploymentStatus": "Initializing"})
    with pytest.raises(K8sError, match="no submitter pod yet"):
        k8s.job_logs("quick-0123abcd")


# ---------------------------------------------------------------------------------------------
# CLI (a fresh Typer app with register(), as orchestrator/cli.py does)
# ---------------------------------------------------------------------------------------------


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def version() -> None:  # a second command so that subcommand names are required, as in driftsweep
        """Stand-in for the other commands."""

    register(app)
    return app


def test_cli_submit_status_logs_against_standin(standin, tmp_path):
    runner = CliRunner()
    plan = _plan_file(tmp_path, MINIMAL_PLAN)
    name = k8s.render_submission(plan)[1]["metadata"]["name"]
    result = runner.invoke(_cli(), ["submit", str(plan), "--k8s", "--context", "standin"])
    assert result.exit_code == 0, result.output
    assert f"submitted RayJob {name}" in result.stdout
    standin.objects[f"{RAY_PATH}/rayjobs/{name}"]["status"] = {"jobStatus": "SUCCEEDED",
                                                               "jobDeploymentStatus": "Complete"}
    result = runner.invoke(_cli(), ["k8s", "status", name, "-n", "driftsweep"])
    assert result.exit_code == 0 and "job_status: SUCCEEDED" in result.stdout
    _add_pod(standin, f"{name}-abcde", name, "2026-11-24T09:00:00Z", "sweep done: 8 trials\n")
    for command in (["logs", name], ["k8s", "logs", name]):
        result = runner.invoke(_cli(), command)
        assert result.exit_code == 0 and result.stdout == "sweep done: 8 trials\n"


def test_cli_render_prints_the_objects_submit_creates(tmp_path):
    plan = _plan_file(tmp_path, MINIMAL_PLAN)
    result = CliRunner().invoke(_cli(), ["k8s", "render", str(plan), "--namespace", "ml", "--image", "img:2"])
    assert result.exit_code == 0, result.output
    assert list(yaml.safe_load_all(result.stdout)) == k8s.render_submission(plan, namespace="ml", image="img:2")


@pytest.mark.parametrize("args, message", [
    (["submit", "PLAN"], "error: submit needs --k8s"),
    (["submit", "PLAN", "--k8s", "-n", "other"], "error: RayCluster driftsweep not found in namespace other"),
    (["k8s", "status", "absent"], "error: RayJob absent not found"),
    (["k8s", "render", "missing.yaml"], "error: missing.yaml: (file): not found"),
])
def test_cli_errors_are_one_line_on_stderr_with_exit_2(standin, tmp_path, args, message):
    plan = _plan_file(tmp_path, MINIMAL_PLAN)
    result = CliRunner().invoke(_cli(), [str(plan) if a == "PLAN" else a for a in args])
    assert result.exit_code == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output


def test_quick_example_renders_for_the_smoke_script():
    # scripts/k8s-smoke.sh submits examples/quick.yaml: its plan must stay renderable and CPU-only
    # (the dev overlay has no GPUs).
    config_map, _ = k8s.render_submission(QUICK)
    plan = parse_plan(next(iter(config_map["data"].values())))
    assert plan.resources.gpus_per_trial == 0
