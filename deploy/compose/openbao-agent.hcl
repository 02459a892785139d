# OpenBao Agent for deploy/docker-compose.yml: it plays the part the Vault
# Agent injector plays in Kubernetes, rendering each service's credentials
# file (the JSON the SDK reads from AUTH_CREDENTIALS_FILE) from KV v2 and
# re-rendering it when the secret changes.

pid_file = "/tmp/openbao-agent.pid"

vault {
  address = "http://openbao:8200"
}

auto_auth {
  method "token_file" {
    config = {
      token_file_path = "/state/bao/agent.token"
    }
  }
}

template_config {
  static_secret_render_interval = "30s"
  exit_on_retry_failure         = true
}

template {
  destination = "/run/credentials/order/credentials.json"
  perms       = "0400"
  contents    = <<-EOT
  {{- with secret "secret/data/shop/order/auth-client" -}}{{ .Data.data | toJSON }}{{- end }}
  EOT
}

template {
  destination = "/run/credentials/inventory/credentials.json"
  perms       = "0400"
  contents    = <<-EOT
  {{- with secret "secret/data/shop/inventory/auth-client" -}}{{ .Data.data | toJSON }}{{- end }}
  EOT
}
