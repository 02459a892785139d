#!/usr/bin/env python3
"""Offline checks for deploy/, run by deploy/validate.sh inside its virtualenv.

Subcommands:

  manifests K8S_VERSION... -- FILE...
      Validates every resource in rendered (kustomize-built) manifests:
      - core kinds against kubernetes-validate's bundled JSON schemas, in
        strict mode (unknown fields are errors), for each Kubernetes version
        given; a core kind without a schema is an error, not a warning;
      - cert-manager kinds (Certificate, Issuer, ClusterIssuer), which have no
        bundled schema, with the structural checks in check_cert_manager();
        any other kind without a schema fails;
      - cross-references kubernetes-validate cannot see: Services select a
        pod template and name existing ports, volumes name ConfigMaps and
        Secrets that exist (or that a Certificate or a documented external
        step creates), PDB/HPA targets exist, NetworkPolicy ports are served;
      - the restricted Pod Security Standard plus house rules on every pod
        template (non-root, seccomp, no privilege escalation, drop ALL,
        read-only root filesystem, a memory limit, probes);
      - the auth-server.toml in the ConfigMap parses and every file path it
        names lies under a volume the auth-server container mounts.

  configs FILE...
      Parses TOML configs and checks the keys the auth-server expects.

  compose FILE
      Cross-checks docker-compose.yml (bind-mount sources, Dockerfile and
      build targets, depends_on, named volumes, config paths under mounts).

Exit status is non-zero on any failure; each failure prints one line.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import yaml

FAILURES: list[str] = []


def fail(where: str, msg: str) -> None:
    FAILURES.append(f"{where}: {msg}")


# --------------------------------------------------------------------------
# auth-server.toml
# --------------------------------------------------------------------------

TOP_KEYS = {
    "issuer", "grpc_addr", "http_addr", "http_public_url", "http_tls", "store", "users_file",
    "accounts_file", "log_format", "tls", "keys", "tokens", "redis", "watch", "limits", "audit", "otel",
}
AUDIT_KEYS = {"enabled", "path"}
HTTP_TLS_KEYS = {"cert", "key", "client_ca"}
REQUIRED_TOP = {"issuer", "grpc_addr", "http_addr", "store", "users_file", "accounts_file", "tls", "keys"}
TLS_KEYS = {"cert", "key", "client_ca"}
TLS_OPTIONAL = {"reload_check_secs": (0, 3600), "expiry_warn_days": (0, 365)}
TOKEN_KEYS = {
    "access_ttl_secs", "refresh_ttl_secs", "exchange_default_ttl_secs",
    "exchange_max_ttl_secs", "max_act_depth", "user_audiences", "admin_perm",
    "self_audience", "refresh_reuse_grace_secs", "verifier_leeway_secs",
    "record_issued",
}
REDIS_KEYS = {
    "prefix",
    "pool_size",
    "durable_pool_size",
    "command_timeout_ms",
    "subscriber_ping_ms",
    "min_replicas_acked",
    "replica_ack_timeout_ms",
    "layout",
}
ALGS = {"ES256", "EdDSA", "RS256", "PS256"}


def check_server_config(where: str, cfg: dict[str, Any]) -> list[str]:
    """Checks one auth-server config; returns the file paths it names."""
    paths: list[str] = []
    for key in cfg:
        if key not in TOP_KEYS:
            fail(where, f"unknown top-level key {key!r}")
    for key in REQUIRED_TOP - cfg.keys():
        fail(where, f"missing key {key!r}")
    store = cfg.get("store", "")
    if not (store == "memory" or re.match(r"^rediss?://", str(store))):
        fail(where, f"store must be 'memory' or a redis:// / rediss:// URL, got {store!r}")
    if cfg.get("log_format", "json") not in ("json", "text"):
        fail(where, "log_format must be 'json' or 'text'")
    for key in ("grpc_addr", "http_addr"):
        if key in cfg and not re.match(r"^(\[[0-9a-fA-F:.]+\]|[0-9.]+|[A-Za-z0-9.-]+):\d+$", cfg[key]):
            fail(where, f"{key} is not host:port: {cfg[key]!r}")
    for key in ("users_file", "accounts_file"):
        if key in cfg:
            paths.append(cfg[key])
    audit = cfg.get("audit", {})
    for key in set(audit) - AUDIT_KEYS:
        fail(where, f"[audit] unknown key {key!r}")
    if not isinstance(audit.get("enabled", True), bool):
        fail(where, "[audit] enabled must be true or false")
    if "path" in audit and not str(audit["path"]).startswith("/"):
        fail(where, "[audit] path should be absolute in a deployment")
    if "http_public_url" in cfg and not re.match(r"^https?://[^/?#@\s]+(/[^?#\s]*)?$", cfg["http_public_url"]):
        fail(where, f"http_public_url is not an absolute http(s) URL: {cfg['http_public_url']!r}")
    http_tls = cfg.get("http_tls")
    if http_tls is not None:
        if not {"cert", "key"} <= set(http_tls) <= HTTP_TLS_KEYS:
            fail(where, f"[http_tls] needs cert and key (client_ca optional), has {sorted(http_tls)}")
        paths += [http_tls[k] for k in HTTP_TLS_KEYS if k in http_tls]
    tls = cfg.get("tls", {})
    if set(tls) - TLS_OPTIONAL.keys() != TLS_KEYS:
        fail(where, f"[tls] needs {sorted(TLS_KEYS)}, optionally {sorted(TLS_OPTIONAL)}, has {sorted(tls)}")
    for key, (low, high) in TLS_OPTIONAL.items():
        if key in tls and not (isinstance(tls[key], int) and low <= tls[key] <= high):
            fail(where, f"[tls] {key} must be an integer from {low} to {high}")
    paths += [tls[k] for k in TLS_KEYS if k in tls]
    keys = cfg.get("keys", {})
    source = keys.get("source")
    if source == "file":
        signing = keys.get("signing")
        if not isinstance(signing, dict) or "path" not in signing:
            fail(where, "[keys] source = 'file' needs signing = { path, alg }")
        else:
            if signing.get("alg") not in ALGS:
                fail(where, f"[keys.signing] alg must be one of {sorted(ALGS)}")
            paths.append(signing["path"])
        if "transit" in keys:
            fail(where, "[keys.transit] is set but source = 'file'")
    elif source == "transit":
        transit = keys.get("transit")
        if not isinstance(transit, dict):
            fail(where, "[keys] source = 'transit' needs a [keys.transit] table")
        else:
            for k in ("address", "mount", "key"):
                if k not in transit:
                    fail(where, f"[keys.transit] missing {k!r}")
            if not re.match(r"^https?://", str(transit.get("address", ""))):
                fail(where, "[keys.transit] address must be an http(s) URL")
            auth = transit.get("auth", {})
            method = auth.get("method", "token")
            if method == "token":
                if "token_file" in auth:
                    paths.append(auth["token_file"])
            elif method == "approle":
                for k in ("role_id_file", "secret_id_file"):
                    if k in auth:
                        paths.append(auth[k])
            else:
                fail(where, "[keys.transit.auth] method must be 'token' or 'approle'")
            if "token_file" in transit or "approle" in transit:
                fail(where, "[keys.transit] login settings belong in [keys.transit.auth]")
        if "signing" in keys:
            fail(where, "[keys] signing is set but source = 'transit'")
    else:
        fail(where, f"[keys] source must be 'file' or 'transit', got {source!r}")
    if not isinstance(keys.get("allow_readable_key_files", False), bool):
        fail(where, "[keys] allow_readable_key_files must be true or false")
    publish = keys.get("publish", [])
    if not isinstance(publish, list):
        fail(where, "[keys] publish must be a list")
    else:
        for entry in publish:
            if not isinstance(entry, dict) or "path" not in entry or entry.get("alg") not in ALGS:
                fail(where, "[keys] publish entries are { path, alg }")
            else:
                paths.append(entry["path"])
    tokens = cfg.get("tokens", {})
    for key in tokens:
        if key not in TOKEN_KEYS:
            fail(where, f"unknown key [tokens] {key!r}")
    if tokens.get("exchange_max_ttl_secs", 600) > 600:
        fail(where, "[tokens] exchange_max_ttl_secs above the 600 s hard cap")
    if tokens.get("exchange_default_ttl_secs", 300) > tokens.get("exchange_max_ttl_secs", 600):
        fail(where, "[tokens] exchange_default_ttl_secs above exchange_max_ttl_secs")
    for key in cfg.get("redis", {}):
        if key not in REDIS_KEYS:
            fail(where, f"unknown key [redis] {key!r}")
    for key in cfg.get("watch", {}):
        if key != "heartbeat_secs":
            fail(where, f"unknown key [watch] {key!r}")
    # At most a third of the SDK's default stale bound (30 s).
    if not 1 <= cfg.get("watch", {}).get("heartbeat_secs", 5) <= 10:
        fail(where, "[watch] heartbeat_secs must be between 1 and 10")
    if tokens.get("verifier_leeway_secs", 30) > 300:
        fail(where, "[tokens] verifier_leeway_secs above the SDK's 300 s maximum")
    return paths


def check_accounts(where: str, doc: dict[str, Any]) -> None:
    for key in doc:
        if key != "account":
            fail(where, f"unknown top-level key {key!r}")
    for i, acct in enumerate(doc.get("account", [])):
        at = f"{where} account[{i}]"
        for key in ("client_id", "secret_sha256", "role"):
            if key not in acct:
                fail(at, f"missing {key!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", str(acct.get("secret_sha256", ""))):
            fail(at, "secret_sha256 must be 64 lower-case hex digits")
        ident = acct.get("mtls_identity")
        if ident is not None and not re.match(r"^spiffe://[^/]+/", ident):
            fail(at, f"mtls_identity should be a SPIFFE id, got {ident!r}")
        for aud, scopes in acct.get("audiences", {}).items():
            if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
                fail(at, f"audiences.{aud} must be a list of scope strings")


def check_users(where: str, doc: dict[str, Any]) -> None:
    for key in doc:
        if key != "user":
            fail(where, f"unknown top-level key {key!r}")
    for i, user in enumerate(doc.get("user", [])):
        at = f"{where} user[{i}]"
        for key in ("username", "password_hash", "role"):
            if key not in user:
                fail(at, f"missing {key!r}")
        if not str(user.get("password_hash", "")).startswith("$argon2id$"):
            fail(at, "password_hash must be an argon2id PHC string")


def check_toml_text(where: str, name: str, text: str) -> list[str]:
    """Dispatches on the file's role (by name); returns the paths a server config names."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail(where, f"invalid TOML: {e}")
        return []
    if name.startswith("users"):
        check_users(where, doc)
    elif name.startswith("accounts"):
        check_accounts(where, doc)
    else:
        return check_server_config(where, doc)
    return []


def cmd_configs(files: list[str]) -> None:
    for f in files:
        check_toml_text(f, Path(f).name, Path(f).read_text())


# --------------------------------------------------------------------------
# Kubernetes manifests
# --------------------------------------------------------------------------

CERT_MANAGER = "cert-manager.io/v1"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
# Secrets created outside the manifests, by a documented step.
EXTERNAL_SECRETS = {("auth", "auth-redis")}
VAULT_SECRETS_DIR = "/vault/secrets"


def load_docs(path: str) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def ident(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata", {})
    ns = meta.get("namespace")
    return f"{doc.get('kind')}/{ns + '/' if ns else ''}{meta.get('name')}"


def check_cert_manager(where: str, doc: dict[str, Any], issuers: set[tuple[str, str, str]]) -> None:
    kind = doc["kind"]
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        fail(where, "spec missing")
        return
    if kind in ("Issuer", "ClusterIssuer"):
        types = [k for k in ("selfSigned", "ca", "vault", "acme", "venafi") if k in spec]
        if len(types) != 1:
            fail(where, f"exactly one issuer type expected, found {types}")
        if "ca" in spec and "secretName" not in spec["ca"]:
            fail(where, "ca issuer needs ca.secretName")
        if kind == "Issuer" and "namespace" not in doc["metadata"]:
            fail(where, "an Issuer is namespaced")
        if kind == "ClusterIssuer" and "namespace" in doc["metadata"]:
            fail(where, "a ClusterIssuer is cluster-scoped")
    elif kind == "Certificate":
        known = {
            "secretName", "issuerRef", "dnsNames", "uris", "commonName", "duration",
            "renewBefore", "privateKey", "usages", "isCA", "ipAddresses", "subject",
            "secretTemplate", "revisionHistoryLimit",
        }
        for key in spec:
            if key not in known:
                fail(where, f"unknown Certificate field spec.{key}")
        if not isinstance(spec.get("secretName"), str):
            fail(where, "spec.secretName missing")
        ref = spec.get("issuerRef", {})
        ref_kind = ref.get("kind", "Issuer")
        ns = doc["metadata"].get("namespace", "")
        key = (ref_kind, "" if ref_kind == "ClusterIssuer" else ns, ref.get("name", ""))
        if key not in issuers:
            fail(where, f"issuerRef {ref_kind}/{ref.get('name')} is not defined in this render")
        if not (spec.get("dnsNames") or spec.get("uris") or spec.get("commonName")):
            fail(where, "a Certificate needs dnsNames, uris or commonName")
        for uri in spec.get("uris", []):
            ns_part = f"/ns/{ns}/" if not spec.get("isCA") else "/"
            if not uri.startswith("spiffe://") or ns_part not in uri:
                fail(where, f"URI SAN {uri!r} is not a SPIFFE id in namespace {ns}")
        usages = set(spec.get("usages", []))
        allowed = {"server auth", "client auth", "digital signature", "key encipherment", "cert sign"}
        if usages - allowed:
            fail(where, f"unexpected usages {sorted(usages - allowed)}")
        pk = spec.get("privateKey", {})
        if pk.get("algorithm", "RSA") not in ("RSA", "ECDSA", "Ed25519"):
            fail(where, "privateKey.algorithm must be RSA, ECDSA or Ed25519")
        for field in ("duration", "renewBefore"):
            if field in spec and not re.fullmatch(r"(\d+h)?(\d+m)?(\d+s)?", spec[field]):
                fail(where, f"{field} must be a Go duration such as 720h")
    else:
        fail(where, f"no schema and no structural check for {doc['apiVersion']} {kind}")


def check_pod_security(where: str, pod: dict[str, Any]) -> None:
    psc = pod.get("securityContext", {})
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(where, "pod securityContext.seccompProfile.type must be RuntimeDefault")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        fail(where, "host namespaces are not allowed")
    for vol in pod.get("volumes", []):
        if "hostPath" in vol:
            fail(where, f"hostPath volume {vol['name']} is not allowed")
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        at = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            fail(at, "runAsNonRoot must be true")
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        if uid is None or uid == 0:
            fail(at, "runAsUser must be set and non-zero")
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(at, "allowPrivilegeEscalation must be false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            fail(at, "capabilities.drop must be [ALL]")
        if sc.get("capabilities", {}).get("add"):
            fail(at, "no capabilities may be added")
        if sc.get("readOnlyRootFilesystem") is not True:
            fail(at, "readOnlyRootFilesystem must be true")
        if sc.get("privileged"):
            fail(at, "privileged is not allowed")
        res = c.get("resources", {})
        if "memory" not in res.get("limits", {}):
            fail(at, "a memory limit is required")
        if "cpu" not in res.get("requests", {}) or "memory" not in res.get("requests", {}):
            fail(at, "cpu and memory requests are required")
        if "readinessProbe" not in c or "livenessProbe" not in c:
            fail(at, "readiness and liveness probes are required")
        image = c.get("image", "")
        if ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
            fail(at, f"image {image!r} has no tag or digest")
        if image.endswith(":latest"):
            fail(at, "image tag 'latest' is not allowed")
        port_names = {p.get("name") for p in c.get("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = c.get(probe, {})
            for handler in ("httpGet", "tcpSocket", "grpc"):
                port = spec.get(handler, {}).get("port")
                if isinstance(port, str) and port not in port_names:
                    fail(at, f"{probe} names port {port!r}, which the container does not declare")


def mounted_dirs(pod_meta: dict[str, Any], container: dict[str, Any]) -> list[str]:
    dirs = [m["mountPath"].rstrip("/") for m in container.get("volumeMounts", [])]
    annotations = pod_meta.get("annotations", {}) or {}
    if annotations.get("vault.hashicorp.com/agent-inject") == "true":
        dirs.append(VAULT_SECRETS_DIR)
    return dirs


def under(path: str, dirs: Iterable[str]) -> bool:
    return any(path.startswith(d + "/") for d in dirs)


def vault_files(pod_meta: dict[str, Any]) -> set[str]:
    ann = pod_meta.get("annotations", {}) or {}
    files = set()
    for key in ann:
        m = re.match(r"^vault\.hashicorp\.com/agent-inject-secret-(.+)$", key)
        if m:
            files.add(f"{VAULT_SECRETS_DIR}/{m.group(1)}")
            if f"vault.hashicorp.com/agent-inject-template-{m.group(1)}" not in ann:
                fail(ident_meta(pod_meta), f"secret {m.group(1)} has no template annotation")
    if ann.get("vault.hashicorp.com/agent-inject-token") == "true":
        files.add(f"{VAULT_SECRETS_DIR}/token")
    if ann.get("vault.hashicorp.com/agent-inject") == "true" and "vault.hashicorp.com/role" not in ann:
        fail(ident_meta(pod_meta), "Vault Agent injection needs vault.hashicorp.com/role")
    return files


def ident_meta(meta: dict[str, Any]) -> str:
    return f"pod template {meta.get('labels', {}).get('app.kubernetes.io/name', '?')}"


def cmd_manifests(versions: list[str], files: list[str]) -> None:
    from kubernetes_validate import utils as kv

    for f in files:
        docs = load_docs(f)
        if not docs:
            fail(f, "renders no resources")
            continue
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for d in docs:
            by_kind.setdefault(d.get("kind", "?"), []).append(d)
        issuers = {
            (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])
            for d in docs if d.get("apiVersion") == CERT_MANAGER and d["kind"] in ("Issuer", "ClusterIssuer")
        }
        names = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in docs}
        cert_secrets = {
            (d["metadata"].get("namespace", ""), d["spec"]["secretName"])
            for d in by_kind.get("Certificate", []) if isinstance(d.get("spec"), dict) and "secretName" in d["spec"]
        }
        namespaces = {d["metadata"]["name"] for d in by_kind.get("Namespace", [])}

        # 1. Schemas.
        seen: set[str] = set()
        for d in docs:
            where = f"{os.path.basename(f)} {ident(d)}"
            if where in seen:
                fail(where, "duplicate resource")
            seen.add(where)
            ns = d.get("metadata", {}).get("namespace")
            if ns and ns not in namespaces and ns != "cert-manager":
                fail(where, f"namespace {ns} is not created by this render")
            if d.get("apiVersion") == CERT_MANAGER:
                check_cert_manager(where, d, issuers)
                continue
            for v in versions:
                try:
                    kv.validate(d, v, strict=True)
                except kv.ValidationError as e:
                    path = ".".join(str(p) for p in e.path)
                    fail(where, f"k8s {v}: {path}: {e.message}")
                except kv.SchemaNotFoundError as e:
                    fail(where, f"k8s {v}: {e.message}")

        # 2. Workloads: security, references, config paths.
        pods: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for d in docs:
            if d["kind"] not in WORKLOADS:
                continue
            where = f"{os.path.basename(f)} {ident(d)}"
            ns = d["metadata"].get("namespace", "")
            tmpl = d["spec"]["template"]
            pod = tmpl["spec"]
            pods.append((d, tmpl))
            selector = d["spec"]["selector"].get("matchLabels", {})
            labels = tmpl["metadata"].get("labels", {})
            if any(labels.get(k) != v for k, v in selector.items()):
                fail(where, "selector does not match the pod template labels")
            check_pod_security(where, pod)
            sa = pod.get("serviceAccountName")
            if sa and ("ServiceAccount", ns, sa) not in names:
                fail(where, f"ServiceAccount {sa} is not defined")
            if (tmpl["metadata"].get("annotations", {}) or {}).get("vault.hashicorp.com/agent-inject") == "true":
                if pod.get("automountServiceAccountToken") is False:
                    fail(where, "Vault Agent's Kubernetes auth needs the ServiceAccount token mounted")
            claims = {t["metadata"]["name"] for t in d["spec"].get("volumeClaimTemplates", [])}
            for vol in pod.get("volumes", []):
                if "configMap" in vol and ("ConfigMap", ns, vol["configMap"]["name"]) not in names:
                    fail(where, f"volume {vol['name']}: ConfigMap {vol['configMap']['name']} is not defined")
                if "secret" in vol:
                    sname = vol["secret"]["secretName"]
                    if ("Secret", ns, sname) not in names and (ns, sname) not in cert_secrets:
                        fail(where, f"volume {vol['name']}: Secret {sname} is neither defined nor issued")
            vol_names = {v["name"] for v in pod.get("volumes", [])} | claims
            for c in pod["containers"]:
                for m in c.get("volumeMounts", []):
                    if m["name"] not in vol_names:
                        fail(where, f"container {c['name']} mounts undefined volume {m['name']}")
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref and ("Secret", ns, ref["name"]) not in names and (ns, ref["name"]) not in EXTERNAL_SECRETS:
                        fail(where, f"env {env['name']}: Secret {ref['name']} is not defined")
                # The auth-server reads AUTH_SERVER_<KEY> (nested keys joined by
                # "__") as config overrides, and no other AUTH_ variable.
                if c["name"] == "auth-server":
                    for env in c.get("env", []):
                        name = env["name"]
                        if name in ("AUTH_SERVER_CONFIG", "AUTH_SERVER_ID"):
                            continue
                        if name.startswith("AUTH_SERVER_"):
                            top = name[len("AUTH_SERVER_"):].split("__")[0].lower()
                            if top not in TOP_KEYS:
                                fail(where, f"env {name}: {top!r} is not an auth-server config key")
                        elif name.startswith("AUTH_"):
                            fail(where, f"env {name}: the auth-server reads AUTH_SERVER_* overrides only")
                # Files the SDK reads must be mounted (or rendered by the Vault Agent).
                dirs = mounted_dirs(tmpl["metadata"], c)
                rendered = vault_files(tmpl["metadata"])
                for env in c.get("env", []):
                    if env["name"] in ("AUTH_CREDENTIALS_FILE", "AUTH_TLS_CERT", "AUTH_TLS_KEY", "AUTH_TLS_CA"):
                        val = env.get("value", "")
                        if not under(val, dirs):
                            fail(where, f"env {env['name']}={val} is not under a mounted volume")
                        if val.startswith(VAULT_SECRETS_DIR + "/") and val not in rendered:
                            fail(where, f"env {env['name']}={val} is not rendered by a Vault annotation")
                # The auth-server's own config.
                for vol in pod.get("volumes", []):
                    cm = vol.get("configMap")
                    if not cm:
                        continue
                    mount = next((m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] == vol["name"]), None)
                    if mount is None:
                        continue
                    cmdoc = next(x for x in docs if x["kind"] == "ConfigMap" and x["metadata"]["name"] == cm["name"]
                                 and x["metadata"].get("namespace", "") == ns)
                    for key, text in (cmdoc.get("data") or {}).items():
                        if not key.endswith(".toml"):
                            continue
                        cfg_where = f"{where} {cm['name']}:{key}"
                        paths = check_toml_text(cfg_where, key, text)
                        for p in paths:
                            if not under(p, dirs):
                                fail(cfg_where, f"path {p} is not under a volume of container {c['name']}")
                            if p.startswith(VAULT_SECRETS_DIR + "/") and p not in rendered:
                                fail(cfg_where, f"path {p} is not rendered by a Vault annotation")
                        if key.endswith(".toml") and key not in ("users.toml", "accounts.toml"):
                            args = c.get("args", [])
                            if f"{mount.rstrip('/')}/{key}" not in args:
                                fail(where, f"container {c['name']} is not started with --config {mount}/{key}")
                            cfg = tomllib.loads(text)
                            for fkey in ("users_file", "accounts_file"):
                                fname = Path(cfg.get(fkey, "")).name
                                if cfg.get(fkey, "").startswith(mount.rstrip("/") + "/") and fname not in cmdoc["data"]:
                                    fail(cfg_where, f"{fkey} {cfg[fkey]} is not a key of ConfigMap {cm['name']}")
                            ports = {p["containerPort"] for p in c.get("ports", [])}
                            for akey in ("grpc_addr", "http_addr"):
                                port = int(cfg.get(akey, ":0").rsplit(":", 1)[1])
                                if port not in ports:
                                    fail(cfg_where, f"{akey} port {port} is not a container port")
                            # A scraper must find /metrics where the server serves it.
                            notes = tmpl["metadata"].get("annotations", {}) or {}
                            if notes.get("prometheus.io/scrape") == "true":
                                http_port = int(cfg.get("http_addr", ":0").rsplit(":", 1)[1])
                                if notes.get("prometheus.io/port") != str(http_port):
                                    fail(where, f"prometheus.io/port is not http_addr's port {http_port}")
                                if notes.get("prometheus.io/path", "/metrics") != "/metrics":
                                    fail(where, "prometheus.io/path is not /metrics")

        # Accounts pinned to an mTLS identity must name one that a Certificate issues.
        cert_uris = {u for d in by_kind.get("Certificate", []) for u in d.get("spec", {}).get("uris", [])}
        for cmdoc in by_kind.get("ConfigMap", []):
            text = (cmdoc.get("data") or {}).get("accounts.toml")
            if text is None:
                continue
            for acct in tomllib.loads(text).get("account", []):
                ident_ = acct.get("mtls_identity")
                if ident_ and ident_ not in cert_uris:
                    fail(f"{os.path.basename(f)} {ident(cmdoc)}",
                         f"account {acct.get('client_id')}: mtls_identity {ident_} is issued by no Certificate")

        # 3. Services, PDBs, HPAs, NetworkPolicies.
        def pods_matching(ns: str, sel: dict[str, str]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
            return [
                (w, t) for (w, t) in pods
                if w["metadata"].get("namespace", "") == ns
                and all(t["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())
            ]

        def container_ports(t: dict[str, Any]) -> tuple[set[str], set[int]]:
            names_, nums = set(), set()
            for c in t["spec"]["containers"]:
                for p in c.get("ports", []):
                    nums.add(p["containerPort"])
                    if "name" in p:
                        names_.add(p["name"])
            return names_, nums

        for d in docs:
            where = f"{os.path.basename(f)} {ident(d)}"
            ns = d["metadata"].get("namespace", "")
            if d["kind"] == "Service":
                matched = pods_matching(ns, d["spec"].get("selector", {}))
                if not matched:
                    fail(where, "selects no pod template")
                for w, t in matched:
                    pn, nums = container_ports(t)
                    for p in d["spec"]["ports"]:
                        tp = p.get("targetPort", p["port"])
                        if (isinstance(tp, str) and tp not in pn) or (isinstance(tp, int) and tp not in nums):
                            fail(where, f"targetPort {tp} is not a port of {ident(w)}")
            elif d["kind"] == "PodDisruptionBudget":
                if not pods_matching(ns, d["spec"]["selector"].get("matchLabels", {})):
                    fail(where, "selects no pod template")
            elif d["kind"] == "HorizontalPodAutoscaler":
                ref = d["spec"]["scaleTargetRef"]
                if (ref["kind"], ns, ref["name"]) not in names:
                    fail(where, f"scaleTargetRef {ref['kind']}/{ref['name']} is not defined")
            elif d["kind"] == "NetworkPolicy":
                sel = d["spec"]["podSelector"].get("matchLabels", {})
                matched = pods_matching(ns, sel)
                if sel and not matched:
                    fail(where, "podSelector selects no pod template")
                for rule in d["spec"].get("ingress", []):
                    for p in rule.get("ports", []):
                        if not any(p["port"] in container_ports(t)[1] | container_ports(t)[0] for _, t in matched):
                            if sel:
                                fail(where, f"port {p['port']} is not served by the selected pods")
                    for peer in rule.get("from", []):
                        psel = peer.get("podSelector", {}).get("matchLabels")
                        if psel and "namespaceSelector" not in peer and not pods_matching(ns, psel):
                            fail(where, f"peer podSelector {psel} selects no pod template")
                        if psel and "namespaceSelector" in peer and not any(
                            all(t["metadata"].get("labels", {}).get(k) == v for k, v in psel.items()) for _, t in pods
                        ):
                            fail(where, f"peer podSelector {psel} selects no pod template in any namespace")

        # 4. The auth server's identity. A pod that dials AUTH_URL demands
        # AUTH_SERVER_ID of the server there: it must be a URI SAN of the
        # Certificate whose Secret the pods behind that Service mount, and of
        # no other Certificate (no other workload may pass as the auth server).
        cert_of_secret = {
            (d["metadata"].get("namespace", ""), d["spec"]["secretName"]): d
            for d in by_kind.get("Certificate", []) if "secretName" in d.get("spec", {})
        }
        holders: dict[str, list[str]] = {}
        for d in by_kind.get("Certificate", []):
            for u in d.get("spec", {}).get("uris", []):
                holders.setdefault(u, []).append(ident(d))
        for w, t in pods:
            where = f"{os.path.basename(f)} {ident(w)}"
            wns = w["metadata"].get("namespace", "")
            for c in t["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                if "AUTH_URL" not in env:
                    continue
                want = env.get("AUTH_SERVER_ID")
                if want is None:
                    fail(where, f"container {c['name']} dials AUTH_URL but names no AUTH_SERVER_ID")
                    continue
                if len(holders.get(want, [])) != 1:
                    fail(where, f"AUTH_SERVER_ID {want} is a URI SAN of {holders.get(want, [])}, not of exactly one "
                                "Certificate")
                host = (urlparse(env["AUTH_URL"] or "").hostname or "").split(".")
                svc_ns = host[1] if len(host) > 1 else wns
                svc = next((d for d in by_kind.get("Service", []) if d["metadata"]["name"] == host[0]
                            and d["metadata"].get("namespace", "") == svc_ns), None)
                if svc is None:
                    fail(where, f"AUTH_URL {env['AUTH_URL']} names no Service of this render")
                    continue
                served_by = set()
                for _, st in pods_matching(svc_ns, svc["spec"].get("selector", {})):
                    for vol in st["spec"].get("volumes", []):
                        cert = cert_of_secret.get((svc_ns, vol.get("secret", {}).get("secretName")))
                        if cert is not None:
                            served_by.add(ident(cert))
                            if want not in cert["spec"].get("uris", []):
                                fail(where, f"AUTH_SERVER_ID {want} is not a URI SAN of {ident(cert)}, the "
                                            f"certificate of the pods behind AUTH_URL")
                if not served_by:
                    fail(where, f"the pods behind AUTH_URL {env['AUTH_URL']} mount no issued certificate")


# --------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------


def cmd_compose(path: str) -> None:
    base = Path(path).resolve().parent
    with open(path) as fh:
        doc = yaml.safe_load(fh)
    services = doc.get("services", {})
    volumes = set((doc.get("volumes") or {}).keys())
    for name, svc in services.items():
        where = f"{os.path.basename(path)} service {name}"
        if "image" not in svc and "build" not in svc:
            fail(where, "needs image or build")
        build = svc.get("build")
        if build:
            ctx = (base / build["context"]).resolve()
            dockerfile = ctx / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                fail(where, f"Dockerfile {dockerfile} does not exist")
            else:
                stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text(), re.M | re.I)
                if build.get("target") and build["target"] not in stages:
                    fail(where, f"build target {build['target']} is not a stage of {dockerfile.name}")
        deps = svc.get("depends_on", {})
        for dep in deps:
            if dep not in services:
                fail(where, f"depends_on unknown service {dep}")
        mounts = [v.split(":")[1].rstrip("/") for v in svc.get("volumes", [])]
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[:2]
            if src.startswith(".") or src.startswith("/"):
                if not (base / src).exists():
                    fail(where, f"bind-mount source {src} does not exist")
                elif dst.endswith(".toml"):
                    paths = check_toml_text(f"{where} {src}", Path(src).name, (base / src).read_text())
                    for p in paths:
                        if not under(p, mounts):
                            fail(f"{where} {src}", f"path {p} is not under a volume of this service")
            elif src not in volumes:
                fail(where, f"named volume {src} is not declared")
        for cmd_part in (svc.get("command") or []) + (svc.get("entrypoint") or []):
            if isinstance(cmd_part, str) and cmd_part.startswith("/compose/"):
                host = base / "compose" / cmd_part[len("/compose/"):]
                if not host.is_file():
                    fail(where, f"{cmd_part} does not exist as {host}")
            m = re.match(r"^-config=(/compose/.+)$", str(cmd_part))
            if m and not (base / "compose" / m.group(1)[len("/compose/"):]).is_file():
                fail(where, f"{m.group(1)} does not exist")
        env = svc.get("environment", {}) or {}
        auth_id = env.get("AUTH_SERVER_ID")
        if auth_id is not None and not re.fullmatch(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+", str(auth_id)):
            fail(where, f"AUTH_SERVER_ID {auth_id!r} is not a SPIFFE id")
        for key in ("AUTH_TLS_CERT", "AUTH_TLS_KEY", "AUTH_TLS_CA", "AUTH_CREDENTIALS_FILE"):
            if key in env and not under(env[key], mounts):
                fail(where, f"{key}={env[key]} is not under a volume of this service")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "manifests":
        if "--" not in args:
            print("usage: check.py manifests VERSION... -- FILE...", file=sys.stderr)
            return 2
        i = args.index("--")
        cmd_manifests(args[:i], args[i + 1:])
    elif cmd == "configs":
        cmd_configs(args)
    elif cmd == "compose":
        cmd_compose(args[0])
    else:
        print(f"unknown subcommand {cmd}", file=sys.stderr)
        return 2
    for line in FAILURES:
        print(f"FAIL {line}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
