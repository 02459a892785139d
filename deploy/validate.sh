#!/usr/bin/env bash
# Offline validation of deploy/, run by CI. Needs no cluster, no Docker
# engine and no network after the first run (which installs the Python tools).
#
#   deploy/validate.sh            # from anywhere
#
# Steps (any failure exits non-zero):
#   1. a virtualenv (deploy/.venv, or $DEPLOY_VENV) with the pinned tools of
#      deploy/requirements-validate.txt; reinstalled only when that file changes;
#   2. yamllint (deploy/.yamllint, strict: warnings fail) on every YAML file;
#   3. shellcheck on the shell scripts;
#   4. kustomize build, through `kubectl kustomize`, of the base, the
#      production overlay, and the production overlay plus the managed-redis
#      component (a scratch copy of deploy/k8s, with a throw-away placeholder
#      for the signing key the base's secretGenerator reads);
#   5. tools/check.py manifests on every rendered resource: kubernetes-validate
#      (bundled schemas, strict) for core kinds against the oldest and newest
#      Kubernetes versions we support; structural checks for cert-manager's
#      CRDs (no bundled schema); cross-references, Pod Security "restricted",
#      and the auth-server config against the volumes that hold its files;
#   6. tools/check.py configs on the sample TOML configs;
#   7. tools/check.py compose on docker-compose.yml (which CI cannot start).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${DEPLOY_VENV:-$here/.venv}"
requirements="$here/requirements-validate.txt"
# Oldest supported (preStop sleep needs 1.30) and newest bundled schemas.
k8s_versions=(1.30 1.37)

step() { printf '==> %s\n' "$*"; }

# 1. Tools -------------------------------------------------------------------
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    step "installing validation tools into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    printf '%s\n' "$want" > "$stamp"
fi
py="$venv/bin/python"

if ! command -v kubectl >/dev/null 2>&1; then
    echo "kubectl not found: it renders the kustomizations (kubectl kustomize)." >&2
    echo "Install a kubectl >= 1.27 (kustomize v5) on PATH." >&2
    exit 1
fi

# 2. yamllint ----------------------------------------------------------------
step "yamllint"
(cd "$here" && "$venv/bin/yamllint" --strict -c .yamllint .)

# 3. shellcheck --------------------------------------------------------------
step "shellcheck"
"$venv/bin/shellcheck" "$here/validate.sh"
"$venv/bin/shellcheck" --shell=sh "$here"/compose/*.sh

# 4. Render ------------------------------------------------------------------
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cp -R "$here/k8s" "$scratch/k8s"
# The base's secretGenerator reads secrets/signing.pem, which is never
# committed; kustomize only copies its bytes, so a placeholder will do.
rm -f "$scratch/k8s/base/secrets/"*.pem
printf 'placeholder, not a key\n' > "$scratch/k8s/base/secrets/signing.pem"
mkdir -p "$scratch/k8s/overlays/production-managed-redis"
cat > "$scratch/k8s/overlays/production-managed-redis/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../production
components:
  - ../../components/managed-redis
EOF

out="$here/.rendered"
rm -rf "$out"
mkdir -p "$out"
for target in base overlays/production overlays/production-managed-redis; do
    name="$(basename "$target")"
    step "kubectl kustomize k8s/$target"
    kubectl kustomize "$scratch/k8s/$target" > "$out/$name.yaml"
done

# 5. Manifests -----------------------------------------------------------------
step "kubernetes-validate (k8s ${k8s_versions[*]}, strict) + cert-manager and cross-reference checks"
"$py" "$here/tools/check.py" manifests "${k8s_versions[@]}" -- "$out"/*.yaml

# 6. Sample configs ------------------------------------------------------------
step "sample configs"
"$py" "$here/tools/check.py" configs "$here"/config/*.toml "$here"/compose/*.toml

# 7. docker-compose.yml ----------------------------------------------------------
step "docker-compose.yml cross-checks (not started: CI has no Docker engine)"
"$py" "$here/tools/check.py" compose "$here/docker-compose.yml"

count="$(grep -c '^kind:' "$out"/*.yaml | awk -F: '{ s += $2 } END { print s }')"
echo "deploy: ${count} rendered resources validated; 0 failed"
