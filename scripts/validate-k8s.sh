#!/usr/bin/env bash
# validate-k8s.sh — validate deploy/kubernetes/ offline against a stated Kubernetes version.
#
#   scripts/validate-k8s.sh [KUBERNETES_VERSION]      (default: $BEAM_K8S_VERSION or 1.31.0)
#
# Uses kubernetes-validate (PyPI; pinned in deploy/kubernetes/requirements-validate.txt) in
# its own venv, build/k8s-venv, so the project's .venv stays as the tests need it.
#   - core kinds (Deployment, Service, PersistentVolumeClaim): --strict, so an unknown or
#     misspelt field fails, not only a wrong type;
#   - the Knative Service: its CRD has no schema offline, so only what Kubernetes defines
#     is checked: its pod template (spec.template.spec minus Knative's own fields,
#     containerConcurrency and timeoutSeconds) wrapped in a Pod, --strict. Knative's own
#     fields and annotations are NOT validated here.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=${1:-${BEAM_K8S_VERSION:-1.31.0}}
dir=$repo/deploy/kubernetes
venv=$repo/build/k8s-venv
req=$dir/requirements-validate.txt
stamp=$venv/.requirements.sha256
sum=$(sha256sum "$req" | cut -d' ' -f1)
if ! [ -x "$venv/bin/kubernetes-validate" ] || [ "$(cat "$stamp" 2>/dev/null || true)" != "$sum" ]; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
  echo "$sum" >"$stamp"
fi
kv=("$venv/bin/kubernetes-validate" -k "$version" --strict --quiet)

core=()
for f in "$dir"/*.yaml; do
  grep -q '^apiVersion: serving.knative.dev/' "$f" || core+=("$f")
done
"${kv[@]}" "${core[@]}"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in "$dir"/*.yaml; do
  grep -q '^apiVersion: serving.knative.dev/' "$f" || continue
  "$venv/bin/python" - "$f" "$tmp/$(basename "$f" .yaml)-podspec.yaml" <<'PY'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
spec = dict(doc["spec"]["template"]["spec"])
for knative_only in ("containerConcurrency", "timeoutSeconds"):
    spec.pop(knative_only, None)
for c in spec["containers"]:
    c.setdefault("name", "user-container")  # Knative names a lone container itself
    # Knative fills in the probe port (the container's port); Kubernetes requires it.
    for probe in ("readinessProbe", "livenessProbe"):
        get = c.get(probe, {}).get("httpGet")
        if get is not None and "port" not in get:
            get["port"] = c["ports"][0]["containerPort"]
pod = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": doc["metadata"]["name"]}, "spec": spec}
yaml.safe_dump(pod, open(sys.argv[2], "w"))
PY
  "${kv[@]}" "$tmp/$(basename "$f" .yaml)-podspec.yaml"
done
echo "validate-k8s: ok (Kubernetes $version; core kinds strict, Knative pod template strict, Knative fields not checked)"
