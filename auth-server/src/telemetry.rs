//! OpenTelemetry trace export: the `[otel]` settings.
//!
//! Off by default. It turns on when `otel.endpoint` is set, or when the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) variable is; `OTEL_SERVICE_NAME`
//! names the service when `otel.service_name` does not, and
//! `OTEL_SDK_DISABLED=true` turns export off whatever the file says. Spans
//! go to an OTLP/gRPC collector in batches, from a background thread (the
//! SDK's `OTEL_BSP_*` variables tune the batches), and the batch still
//! buffered is sent at shutdown.
//!
//! With export on, the edge's per-RPC span ([`crate::edge::trace`]) is
//! named after the RPC (`auth.v1.Auth/ExchangeToken`) and continues the
//! caller's W3C `traceparent`, so an exchange made for a user's request
//! joins that request's trace. With export off, no `traceparent` is read.
//!
//! The spans' fields are the RPC, the caller's certificate identity, the
//! client id, the audiences, the revocation target kind and the gRPC code:
//! never a token, a secret, a password or a header.

use serde::{Deserialize, Serialize};
use service_sdk::otel::{self, OtlpExport};

/// The service name of the spans when neither `otel.service_name` nor
/// `OTEL_SERVICE_NAME` says otherwise.
pub const DEFAULT_SERVICE_NAME: &str = "auth-server";

/// `[otel]`: OTLP trace export (restart to change).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtelConfig {
    /// The OTLP/gRPC collector, `http://host:4317`; unset: the
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` variable; both unset: no export.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The service name in the spans; unset: `OTEL_SERVICE_NAME`, else
    /// `auth-server`.
    #[serde(default)]
    pub service_name: Option<String>,
    /// The share of new traces sampled, 0.0 to 1.0; unset: the SDK's
    /// default (`OTEL_TRACES_SAMPLER`, else all). A trace continued from a
    /// caller keeps the caller's decision.
    #[serde(default)]
    pub sample_ratio: Option<f64>,
    /// Set from `OTEL_SDK_DISABLED=true`: no export whatever the rest says.
    #[serde(skip)]
    pub disabled: bool,
}

impl OtelConfig {
    /// Fills what the file left unset from the standard variables, read
    /// through `var`.
    pub fn with_env(mut self, var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |k: &str| var(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        if self.endpoint.is_none() {
            self.endpoint = set(otel::TRACES_ENDPOINT_VAR).or_else(|| set(otel::ENDPOINT_VAR));
        }
        if self.service_name.is_none() {
            self.service_name = set(otel::SERVICE_NAME_VAR);
        }
        self.disabled = set(otel::SDK_DISABLED_VAR).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        self
    }

    /// The problems of these settings, each with its key.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(e) = &self.endpoint {
            let rest = e.strip_prefix("http://");
            if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                out.push((
                    "otel.endpoint",
                    format!(
                        "must be an http:// URL of an OTLP/gRPC collector (e.g. http://127.0.0.1:4317), not {e:?}; \
                         TLS to the collector is not supported: export to a collector or agent beside the server"
                    ),
                ));
            }
        }
        if self.service_name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            out.push(("otel.service_name", "must not be empty".to_owned()));
        }
        if self.sample_ratio.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
            out.push(("otel.sample_ratio", "must be between 0.0 and 1.0".to_owned()));
        }
        out
    }

    /// The export these settings ask for; `None`: export off.
    pub fn export(&self) -> Option<OtlpExport> {
        if self.disabled {
            return None;
        }
        let endpoint = self.endpoint.as_deref()?;
        let name = self.service_name.as_deref().unwrap_or(DEFAULT_SERVICE_NAME);
        let export = OtlpExport::new(endpoint, name);
        Some(match self.sample_ratio {
            Some(r) => export.sample_ratio(r),
            None => export,
        })
    }

    /// Whether spans are exported (and incoming trace context read).
    pub fn enabled(&self) -> bool {
        !self.disabled && self.endpoint.is_some()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn export_is_off_unless_an_endpoint_is_set() {
        let none = OtelConfig::default().with_env(vars(&[]));
        assert!(!none.enabled());
        assert_eq!(none.export(), None);
        let from_env = OtelConfig::default().with_env(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_SERVICE_NAME", "auth-eu"),
        ]));
        let export = from_env.export().unwrap();
        assert_eq!((export.endpoint(), export.service_name()), ("http://collector:4317", "auth-eu"));
    }

    #[test]
    fn the_file_wins_over_the_variables_and_disabled_wins_over_both() {
        let file = OtelConfig {
            endpoint: Some("http://file:4317".into()),
            service_name: Some("auth".into()),
            ..OtelConfig::default()
        };
        let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"), ("OTEL_SERVICE_NAME", "env")];
        let export = file.clone().with_env(vars(&env)).export().unwrap();
        assert_eq!((export.endpoint(), export.service_name()), ("http://file:4317", "auth"));
        let defaults = OtelConfig { endpoint: Some("http://file:4317".into()), ..OtelConfig::default() };
        assert_eq!(defaults.export().unwrap().service_name(), DEFAULT_SERVICE_NAME);
        let off = file.with_env(vars(&[("OTEL_SDK_DISABLED", "true")]));
        assert!(!off.enabled());
        assert_eq!(off.export(), None);
    }

    #[test]
    fn bad_settings_are_named_by_key() {
        let bad = OtelConfig {
            endpoint: Some("https://collector:4317".into()),
            service_name: Some(" ".into()),
            sample_ratio: Some(1.5),
            disabled: false,
        };
        let keys: Vec<&str> = bad.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["otel.endpoint", "otel.service_name", "otel.sample_ratio"]);
        let schemeless = OtelConfig { endpoint: Some("collector:4317".into()), ..OtelConfig::default() };
        assert_eq!(schemeless.problems().len(), 1);
        let good = OtelConfig {
            endpoint: Some("http://127.0.0.1:4317".into()),
            sample_ratio: Some(0.25),
            ..OtelConfig::default()
        };
        assert!(good.problems().is_empty());
    }
}
