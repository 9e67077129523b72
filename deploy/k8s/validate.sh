#!/usr/bin/env bash
# Validates the Kubernetes manifests of deploy/k8s offline against the API schemas, with
# PyPI's `kubernetes-validate` (schemas bundled, no cluster needed), in strict mode
# (unknown fields are errors). Installs it into the project venv (.venv) when missing.
#
#   deploy/k8s/validate.sh                 # Kubernetes 1.30 (override: K8S_VERSION=1.33.0)
#   deploy/k8s/validate.sh extra.yaml ...  # also validate these files
#
# Checks: every *.yaml here except kustomization.yaml is listed in its `resources`, every
# listed file exists, and each resource passes strict schema validation.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
K8S_DIR="$ROOT/deploy/k8s"
K8S_VERSION="${K8S_VERSION:-1.30.0}"
VALIDATE_VERSION="1.37.0"
VENV="${DMQSM_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "validate.sh: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import kubernetes_validate" 2>/dev/null; then
    echo "validate.sh: installing kubernetes-validate==$VALIDATE_VERSION into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==$VALIDATE_VERSION"
fi

# kustomization.yaml lists every manifest, and only existing ones.
mapfile -t FILES < <("$VENV/bin/python" - "$K8S_DIR" <<'PY'
import pathlib, sys, yaml
d = pathlib.Path(sys.argv[1])
k = yaml.safe_load((d / "kustomization.yaml").read_text())
listed = k.get("resources", [])
present = sorted(p.name for p in d.glob("*.yaml") if p.name != "kustomization.yaml")
missing = [f for f in listed if not (d / f).is_file()]
unlisted = [f for f in present if f not in listed]
if missing or unlisted:
    sys.exit(f"kustomization.yaml: missing files {missing}, unlisted manifests {unlisted}")
for f in listed:
    print(d / f)
PY
)
"$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "${FILES[@]}" "$@"
echo "validate.sh: ${#FILES[@]} manifest files valid for Kubernetes $K8S_VERSION (strict)"
