//! Issuance rate per algorithm next to the raw aws-lc-rs sign rate.
//!
//! `cargo bench -p auth-server --bench signing` prints, for ES256, EdDSA,
//! RS256 and PS256, single-core operations per second of:
//! - `raw`: aws-lc-rs signing the same bytes with the parsed key;
//! - `issue`: a whole token (claims serialized, base64url, signed);
//! - `mint`: issue plus recording the jti in the in-memory store;
//! - `jsonwebtoken`: `jsonwebtoken::encode` (re-parses RSA keys per call);
//!
//! and the ratio issue/raw (target >= 90%). raw and issue run in five
//! interleaved rounds; each reports its best round. Rates are per CPU second
//! of the measuring thread (user + system), not per wall second, so other
//! work on the machine does not decide the ratio. `BENCH_SECS` (default 2)
//! sets the CPU time per measurement.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_server::keys::{FileKeys, KeyAlg, LoadedKey, SigningKeys, generate_pkcs8_pem, signing_input};
use auth_server::store::{IssuedToken, MemoryStore, Store};
use aws_lc_rs::rand::SystemRandom;
use service_sdk::{Actor, Audience, Claims};

fn claims() -> Claims {
    Claims {
        iss: "auth-service".into(),
        sub: "alice".into(),
        aud: Audience::One("inventory".into()),
        exp: 2_000_000_000,
        nbf: 1_700_000_000,
        iat: 1_700_000_000,
        jti: "kD1u3cN2m2L0y6a9XQ4mZg".into(),
        sid: Some("q8Zr0d1sYb2l3n4m5o6p7w".into()),
        client_id: "order".into(),
        role: Some("customer".into()),
        perms: vec!["inventory:read".into(), "inventory:reserve".into()],
        act: Some(Actor { sub: "svc:order".into(), act: None }),
        cnf: None,
    }
}

/// CPU time this thread has used (user + system), from
/// `/proc/thread-self/stat`, in clock ticks of 10 ms (Linux fixes USER_HZ
/// at 100).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("/proc/thread-self/stat (Linux)");
    // The fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Runs `f` until this thread has spent about `secs` of CPU on it and
/// returns operations per CPU second. CPU time, not wall time: on a machine
/// that other work shares, the wall clock counts the time the thread waited
/// for a core, and which of two interleaved measurements waited more is
/// chance; CPU per operation is what it costs. The clock is read every
/// 50 ms of wall time, so reading it costs nothing measurable.
fn rate(secs: f64, mut f: impl FnMut()) -> f64 {
    for _ in 0..50 {
        f();
    }
    let budget = (secs * 100.0).ceil().max(1.0) as u64;
    let start = cpu_ticks();
    let mut n = 0u64;
    let mut last = Instant::now();
    loop {
        for _ in 0..20 {
            f();
        }
        n += 20;
        if last.elapsed() >= Duration::from_millis(50) {
            last = Instant::now();
            let used = cpu_ticks() - start;
            if used >= budget {
                return n as f64 / (used as f64 / 100.0);
            }
        }
    }
}

/// Service-account authentication: SHA-256 of the presented secret and a
/// constant-time compare against the stored digest (budget: <= 5 us).
fn service_auth(secs: f64) {
    use auth_server::directory::{Account, Directory, generate_secret, secret_digest_hex};
    let secret = generate_secret().unwrap();
    let account = Account {
        client_id: "order".into(),
        secret_sha256: secret_digest_hex(&secret),
        mtls_identity: None,
        certificate_bound_tokens: None,
        role: None,
        perms: vec![],
        audiences: Default::default(),
    };
    let dir = Directory::new(vec![], vec![account]).unwrap();
    let ok = rate(secs, || {
        black_box(dir.authenticate_service("order", &secret, None).unwrap());
    });
    let bad = rate(secs, || {
        black_box(dir.authenticate_service("order", "wrong-secret-of-similar-length-000000000000", None).is_err());
    });
    println!("service-account authentication: {:.2} us (right secret), {:.2} us (wrong secret)", 1e6 / ok, 1e6 / bad);
}

fn main() {
    let secs = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    service_auth(secs / 2.0);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let rng = SystemRandom::new();
    let c = claims();
    println!(
        "{:<6} {:>12} {:>12} {:>12} {:>14} {:>10}",
        "alg", "raw/s", "issue/s", "mint/s", "jsonwebtoken/s", "issue/raw"
    );
    for alg in [KeyAlg::ES256, KeyAlg::EdDSA, KeyAlg::RS256, KeyAlg::PS256] {
        let pem = generate_pkcs8_pem(alg).unwrap();
        let key = LoadedKey::from_pem(alg, pem.as_bytes()).unwrap();
        let input = signing_input(alg.as_str(), key.kid(), &c).unwrap();
        // Interleave short rounds and keep each side's best, so a burst of
        // load from elsewhere on the machine cannot favour one side.
        let (mut raw, mut issue) = (0f64, 0f64);
        for _ in 0..5 {
            raw = raw.max(rate(secs / 5.0, || {
                black_box(key.sign_raw(&rng, input.as_bytes()).unwrap());
            }));
            issue = issue.max(rate(secs / 5.0, || {
                black_box(key.sign_claims(&rng, &c).unwrap());
            }));
        }
        let keys = FileKeys::new(LoadedKey::from_pem(alg, pem.as_bytes()).unwrap(), vec![]).unwrap();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let mut i = 0u64;
        let mint = rate(secs, || {
            rt.block_on(async {
                let t = keys.sign(&c).await.unwrap();
                i += 1;
                let rec = IssuedToken { sub: c.sub.clone(), sid: c.sid.clone(), exp: 2_000_000_000 };
                store.record_issued(&i.to_string(), &rec, 1_700_000_000).await.unwrap();
                black_box(t);
            })
        });
        let jwt_alg = match alg {
            KeyAlg::ES256 => jsonwebtoken::Algorithm::ES256,
            KeyAlg::EdDSA => jsonwebtoken::Algorithm::EdDSA,
            KeyAlg::RS256 => jsonwebtoken::Algorithm::RS256,
            KeyAlg::PS256 => jsonwebtoken::Algorithm::PS256,
        };
        let enc = match alg {
            KeyAlg::ES256 => jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()),
            KeyAlg::EdDSA => jsonwebtoken::EncodingKey::from_ed_pem(pem.as_bytes()),
            _ => jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()),
        }
        .unwrap();
        let mut header = jsonwebtoken::Header::new(jwt_alg);
        header.kid = Some(key.kid().to_owned());
        header.typ = Some("at+jwt".into());
        let jwt = rate(secs, || {
            black_box(jsonwebtoken::encode(&header, &c, &enc).unwrap());
        });
        println!(
            "{:<6} {:>12.0} {:>12.0} {:>12.0} {:>14.0} {:>9.1}%",
            alg.as_str(),
            raw,
            issue,
            mint,
            jwt,
            100.0 * issue / raw
        );
    }
}
