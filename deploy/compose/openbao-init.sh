#!/bin/sh
# Configures the dev OpenBao for deploy/docker-compose.yml (runs on every
# "up", since a dev server keeps nothing across restarts):
#   - Transit key "auth-signing" (ECDSA P-256, i.e. ES256) and a token for
#     the auth-server limited to signing with it and reading its public keys;
#   - the service accounts' credentials in KV v2 at secret/shop/<name>/auth-client;
#   - a token for the agent that renders them, limited to reading them.
set -eu

export BAO_ADDR="${BAO_ADDR:-http://openbao:8200}"
export BAO_TOKEN="${BAO_TOKEN:-root}"
STATE=${STATE:-/state}

tries=0
until bao status >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -gt 60 ]; then
        echo "openbao-init: OpenBao at $BAO_ADDR did not come up" >&2
        exit 1
    fi
    sleep 1
done

if ! bao secrets list | grep -q '^transit/'; then
    bao secrets enable transit
fi
if ! bao read transit/keys/auth-signing >/dev/null 2>&1; then
    bao write -f transit/keys/auth-signing type=ecdsa-p256
fi

bao policy write auth-signer - <<'HCL'
path "transit/sign/auth-signing" {
  capabilities = ["update"]
}
path "transit/sign/auth-signing/*" {
  capabilities = ["update"]
}
path "transit/keys/auth-signing" {
  capabilities = ["read"]
}
HCL

bao policy write shop-credentials - <<'HCL'
path "secret/data/shop/+/auth-client" {
  capabilities = ["read"]
}
HCL

for name in order inventory; do
    bao kv put -mount=secret "shop/$name/auth-client" "@$STATE/secrets/$name.json" >/dev/null
done

umask 077
bao token create -policy=auth-signer -period=24h -field=token > "$STATE/bao/auth-server.token"
bao token create -policy=shop-credentials -period=24h -field=token > "$STATE/bao/agent.token"
# The auth-server and the agent run as APP_UID.
chown "${APP_UID:-65532}:${APP_UID:-65532}" "$STATE/bao/auth-server.token" "$STATE/bao/agent.token"
echo "openbao-init: transit key, credentials and tokens ready"
