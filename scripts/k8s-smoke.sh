#!/usr/bin/env bash
# End-to-end smoke test on a REAL Kubernetes cluster (kind, minikube, or any cluster with KubeRay):
#   1. apply the dev overlay (PostgreSQL, MLflow, RayCluster) and create the DB Secret if it is missing,
#   2. wait until PostgreSQL, MLflow and the RayCluster are ready,
#   3. submit the quick example plan (`driftsweep submit --k8s`),
#   4. wait for the RayJob to succeed,
#   5. port-forward the MLflow Service and check through MLflow's REST API that the plan's experiment
#      holds one parent run and one FINISHED child run per trial, each with the objective metric.
# Prints "k8s-smoke: OK ..." and exits 0 on success; "k8s-smoke: FAILED: ..." and exits 1 otherwise.
#
# Needs: kubectl, curl, this repository installed (.venv, scripts/install.sh), the KubeRay operator, and
# the image driftsweep:0.1.0-ray2.60.0 on the nodes (kind: set KIND_CLUSTER=<name> to build and load
# it; needs docker). Settings (environment variables):
#   KUBE_CONTEXT   kubeconfig context            (default: the current context)
#   NAMESPACE      the overlay's namespace       (default: driftsweep)
#   PLAN           plan to submit                (default: examples/quick.yaml)
#   TIMEOUT_S      wait for readiness and for the job, each (default: 1800)
#   LOCAL_PORT     local end of the port-forward (default: 15000)
#   KIND_CLUSTER   build the image and `kind load` it into this kind cluster first (default: unset)
set -euo pipefail
cd "$(dirname "$0")/.."

CONTEXT=${KUBE_CONTEXT:-$(kubectl config current-context)}
NAMESPACE=${NAMESPACE:-driftsweep}
PLAN=${PLAN:-examples/quick.yaml}
TIMEOUT_S=${TIMEOUT_S:-1800}
LOCAL_PORT=${LOCAL_PORT:-15000}
IMAGE=driftsweep:0.1.0-ray2.60.0
PY=.venv/bin/python
DRIFTSWEEP=.venv/bin/driftsweep
kc() { kubectl --context "$CONTEXT" -n "$NAMESPACE" "$@"; }
step() { echo "k8s-smoke: $*"; }
fail() { echo "k8s-smoke: FAILED: $*" >&2; exit 1; }

for tool in kubectl curl; do command -v "$tool" >/dev/null || fail "$tool not found on PATH"; done
[ -x "$DRIFTSWEEP" ] || fail "$DRIFTSWEEP missing: run scripts/install.sh first"
kubectl --context "$CONTEXT" get crd rayjobs.ray.io rayclusters.ray.io >/dev/null 2>&1 \
  || fail "KubeRay CRDs not installed in context $CONTEXT: helm install kuberay-operator kuberay/kuberay-operator"

if [ -n "${KIND_CLUSTER:-}" ]; then
  step "building $IMAGE and loading it into kind cluster $KIND_CLUSTER"
  docker build -t "$IMAGE" .
  kind load docker-image "$IMAGE" --name "$KIND_CLUSTER"
fi

step "applying manifests/overlays/dev to context $CONTEXT"
kubectl --context "$CONTEXT" apply -k manifests/overlays/dev
if ! kc get secret driftsweep-db >/dev/null 2>&1; then
  step "creating Secret driftsweep-db with a random password (kept only in the cluster)"
  kc create secret generic driftsweep-db --from-literal=password="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
fi

step "waiting for PostgreSQL, MLflow and the RayCluster (up to ${TIMEOUT_S}s each)"
kc rollout status statefulset/postgres --timeout="${TIMEOUT_S}s"
kc rollout status deployment/mlflow --timeout="${TIMEOUT_S}s"
kc wait raycluster/driftsweep --for=jsonpath='{.status.state}'=ready --timeout="${TIMEOUT_S}s"

NAME=$("$PY" -c 'import sys; from orchestrator.k8s import render_submission
print(render_submission(sys.argv[1], namespace=sys.argv[2])[1]["metadata"]["name"])' "$PLAN" "$NAMESPACE")
step "submitting $PLAN as RayJob $NAME"
"$DRIFTSWEEP" submit "$PLAN" --k8s --namespace "$NAMESPACE" --context "$CONTEXT"

step "waiting for RayJob $NAME to finish"
deadline=$(( $(date +%s) + TIMEOUT_S ))
while :; do
  job_status=$(kc get rayjob "$NAME" -o jsonpath='{.status.jobStatus}')
  deployment_status=$(kc get rayjob "$NAME" -o jsonpath='{.status.jobDeploymentStatus}')
  case "$job_status" in
    SUCCEEDED) break ;;
    FAILED|STOPPED)
      "$DRIFTSWEEP" logs "$NAME" --namespace "$NAMESPACE" --context "$CONTEXT" | tail -n 40 >&2 || true
      fail "RayJob $NAME ended $job_status (logs above)" ;;
  esac
  [ "$deployment_status" = "Failed" ] && fail "RayJob $NAME: KubeRay reports Failed ($(kc get rayjob "$NAME" -o jsonpath='{.status.message}'))"
  [ "$(date +%s)" -lt "$deadline" ] || fail "RayJob $NAME not done after ${TIMEOUT_S}s (status ${job_status:-none}/${deployment_status:-none})"
  sleep 10
done
step "RayJob $NAME SUCCEEDED"

step "checking MLflow through kubectl port-forward svc/mlflow ${LOCAL_PORT}:5000"
kc port-forward svc/mlflow "${LOCAL_PORT}:5000" >/dev/null 2>&1 &
forward_pid=$!
trap 'kill "$forward_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 30); do curl -fsS "http://127.0.0.1:${LOCAL_PORT}/health" >/dev/null 2>&1 && break; sleep 1; done
curl -fsS "http://127.0.0.1:${LOCAL_PORT}/health" >/dev/null || fail "MLflow not reachable through the port-forward"

"$PY" - "$PLAN" "http://127.0.0.1:${LOCAL_PORT}" <<'EOF'
"""Count the plan's runs with MLflow's REST API: 1 parent, 1 FINISHED child per trial, metric logged."""
import json
import sys
import urllib.parse
import urllib.request

from orchestrator.plan import count_trials, load_plan, resolve_experiment

plan, base = load_plan(sys.argv[1]), sys.argv[2]


def api(path, body=None):
    url = f"{base}/api/2.0/mlflow/{path}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


name = resolve_experiment(plan)
experiment = api("experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": name}))["experiment"]
runs = api("runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000}).get("runs", [])
tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
parents = [r for r, t in zip(runs, tags) if "mlflow.parentRunId" not in t]
children = [r for r, t in zip(runs, tags) if "mlflow.parentRunId" in t]
expected = count_trials(plan)
finished = [r for r in children if r["info"]["status"] == "FINISHED"]
with_metric = [r for r in finished if any(m["key"] == plan.objective.metric for m in r["data"].get("metrics", []))]
print(f"k8s-smoke: experiment {name}: {len(parents)} parent run(s), {len(children)} child runs, "
      f"{len(finished)} FINISHED, {len(with_metric)} with {plan.objective.metric} (expected {expected} trials)")
if not parents or len(finished) < expected or len(with_metric) < expected:
    sys.exit("k8s-smoke: FAILED: MLflow does not hold the expected runs")
EOF
step "OK: RayJob $NAME succeeded and MLflow holds its runs (UI: kubectl -n $NAMESPACE port-forward svc/mlflow 5000)"
