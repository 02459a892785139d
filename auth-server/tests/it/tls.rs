//! TLS files as operators meet them: replaced under a running server the
//! way a Kubernetes Secret volume replaces them (a new directory, then an
//! atomic symlink swap), found by the server's poll or on SIGHUP, with
//! connections open throughout; a broken replacement; an expired
//! certificate; and the real binary refusing a key that is not its
//! certificate's, or a key file other users can read. The HTTP side port's
//! `[http_tls]` files go through the same, and `/metrics` shows each port's
//! certificate expiry and TLS reloads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use auth_server::clock::ManualClock;
use auth_server::config::{HttpTlsConfig, TlsConfig};
use auth_server::dev::pki::Ca;
use auth_server::tls::{CertInfo, rfc3339};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use testkit::TestServer;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::edge::Captured;
use crate::observe::{AuthProcess, Metrics, promtool_check};
use crate::transport::RawH2;
use crate::{PATIENCE, within};

/// A CA that issues the server's own certificates with chosen serials and
/// validity (the dev CA keeps no key, and its certificates all last until
/// 4096).
struct ServingCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A server certificate and its key, PEM.
struct ServerCert {
    cert_pem: String,
    key_pem: String,
}

impl ServingCa {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Self { cert_pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A certificate for `localhost` with `serial`, valid from 2020 until
    /// 31 December of `until_year`, 00:00 UTC.
    fn server_cert(&self, serial: u8, until_year: i32) -> ServerCert {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "auth-server");
        params.subject_alt_names = vec![SanType::DnsName("localhost".try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(SerialNumber::from_slice(&[0x10, serial]));
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(until_year, 12, 31);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        ServerCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }
}

/// A directory laid out as the kubelet lays out a Secret volume: the files
/// are symlinks through `..data`, a symlink to the current version's
/// directory; an update writes a new directory and renames a new symlink
/// over `..data`, so every file changes at once.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: u32,
}

impl SecretVolume {
    const FILES: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];

    fn new(cert: &ServerCert, client_ca: &str) -> Self {
        let mut volume = Self { dir: tempfile::tempdir().unwrap(), version: 0 };
        volume.update(cert, client_ca);
        for name in Self::FILES {
            std::os::unix::fs::symlink(format!("..data/{name}"), volume.path(name)).unwrap();
        }
        volume
    }

    fn update(&mut self, cert: &ServerCert, client_ca: &str) {
        self.update_raw(&cert.cert_pem, &cert.key_pem, client_ca);
    }

    fn update_raw(&mut self, cert_pem: &str, key_pem: &str, client_ca: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let dir = self.dir.path().join(&version);
        std::fs::create_dir(&dir).unwrap();
        for (name, text) in Self::FILES.into_iter().zip([cert_pem, key_pem, client_ca]) {
            crate::write_key_file(dir.join(name), text);
        }
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `[http_tls]` pointing at this volume's certificate and key (no
    /// client certificates).
    fn http_tls_config(&self) -> HttpTlsConfig {
        HttpTlsConfig { cert: self.path("tls.crt"), key: self.path("tls.key"), client_ca: None }
    }

    /// `[tls]` pointing at this volume.
    fn tls_config(&self, reload_check_secs: u64) -> TlsConfig {
        TlsConfig {
            cert: self.path("tls.crt"),
            key: self.path("tls.key"),
            client_ca: self.path("ca.crt"),
            reload_check_secs,
            expiry_warn_days: 7,
        }
    }
}

/// A dev environment made ahead of the server, so the test knows its
/// client CA before the server starts.
fn dev_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    auth_server::dev::ensure(dir.path()).unwrap();
    dir
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref()).unwrap()
}

/// A client trusting `trust` for the server, with the client certificate
/// `cert_pem` and its key.
fn client_config(trust: &[&str], cert_pem: &str, key_pem: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in trust {
        roots.add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// A client trusting `trust` for the server, as dev client `name`.
fn dev_client(dev: &Path, trust: &[&str], name: &str) -> TlsConnector {
    let cert = read(dev.join(format!("clients/{name}.pem")));
    let key = read(dev.join(format!("clients/{name}-key.pem")));
    client_config(trust, &cert, &key)
}

/// A new mTLS connection and the leaf certificate the server presented.
async fn connect(srv: &TestServer, client: &TlsConnector) -> std::io::Result<(TlsStream<TcpStream>, CertInfo)> {
    connect_to(srv.grpc_addr, client).await
}

/// A new TLS connection to `addr` and the leaf certificate it presented.
async fn connect_to(addr: SocketAddr, client: &TlsConnector) -> std::io::Result<(TlsStream<TcpStream>, CertInfo)> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = client.connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).expect("a server certificate");
    let info = CertInfo::from_der(leaf.as_ref()).unwrap();
    Ok((tls, info))
}

/// Connects until the server presents the certificate with `serial`.
async fn until_served(srv: &TestServer, client: &TlsConnector, serial: &str) -> TlsStream<TcpStream> {
    until_served_at(srv.grpc_addr, client, serial).await
}

/// Connects to `addr` until it presents the certificate with `serial`.
async fn until_served_at(addr: SocketAddr, client: &TlsConnector, serial: &str) -> TlsStream<TcpStream> {
    within(&format!("{addr} to present serial {serial}"), async {
        loop {
            if let Ok((tls, info)) = connect_to(addr, client).await
                && info.serial == serial
            {
                return tls;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

fn serial_of(cert: &ServerCert) -> String {
    let der = CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap();
    CertInfo::from_der(der.as_ref()).unwrap().serial
}

/// Whether a client with `(cert, key)` completes a call: the server checks
/// a client certificate after the client's side of the TLS 1.3 handshake,
/// so a refusal shows at the first exchange.
async fn client_is_accepted(srv: &TestServer, trust: &[&str], cert: &str, key: &str) -> bool {
    let Ok((tls, _)) = connect(srv, &client_config(trust, cert, key)).await else { return false };
    let Ok((send, conn)) = h2::client::handshake(tls).await else { return false };
    tokio::spawn(conn);
    let Ok(mut send) = send.ready().await else { return false };
    let req = http::Request::post("https://localhost/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let Ok((response, mut stream)) = send.send_request(req, false) else { return false };
    if stream.send_data(crate::transport::grpc_frame(&[]).into(), true).is_err() {
        return false;
    }
    matches!(response.await, Ok(r) if r.status() == http::StatusCode::OK)
}

#[tokio::test]
async fn a_rotated_certificate_key_and_client_ca_reach_new_connections_while_open_ones_keep_working() {
    let dev = dev_dir();
    let dev_ca = read(dev.path().join("ca.pem"));
    let (old_ca, new_ca) = (ServingCa::new("serving CA 1"), ServingCa::new("serving CA 2"));
    let first = old_ca.server_cert(1, 2090);
    let mut volume = SecretVolume::new(&first, &dev_ca);
    let tls = volume.tls_config(1);
    let srv = TestServer::builder().dev_dir(dev.path()).configure(move |raw| raw.tls = Some(tls)).start().await;
    let trust = [old_ca.cert_pem.as_str(), new_ca.cert_pem.as_str()];
    let order = dev_client(dev.path(), &trust, "order");
    // A client of a CA the server does not trust yet.
    let other_clients = Ca::generate("new client CA").unwrap();
    let stranger = other_clients.client_cert("auth.dev", "order").unwrap();

    let (tls, served) = connect(&srv, &order).await.unwrap();
    assert_eq!(served.serial, serial_of(&first));
    let mut open = RawH2::over(tls).await;
    open.get_jwks().await;
    assert!(!client_is_accepted(&srv, &trust, &stranger.cert_pem, &stranger.key_pem).await);

    // cert-manager renews: a new key, a certificate from a new CA, and a
    // client CA bundle that adds a CA.
    let second = new_ca.server_cert(2, 2091);
    volume.update(&second, &format!("{dev_ca}{}", other_clients.cert_pem));
    let tls = until_served(&srv, &order, &serial_of(&second)).await;
    let mut fresh = RawH2::over(tls).await;
    fresh.get_jwks().await;
    // The connection made before the rotation was never cut.
    open.get_jwks().await;
    assert!(!open.is_closed(), "a connection open across the rotation was closed");
    // The new client CA is in force for new connections.
    assert!(client_is_accepted(&srv, &trust, &stranger.cert_pem, &stranger.key_pem).await);
    let (_, served) = connect(&srv, &order).await.unwrap();
    assert_eq!((served.serial, rfc3339(served.not_after)), (serial_of(&second), "2091-12-31T00:00:00Z".to_owned()));
}

#[tokio::test(flavor = "current_thread")]
async fn a_broken_replacement_keeps_the_running_set_logs_why_once_and_a_fixed_one_is_taken() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt().with_writer(captured.clone()).with_ansi(false).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    let dev = dev_dir();
    let dev_ca = read(dev.path().join("ca.pem"));
    let ca = ServingCa::new("serving CA");
    let first = ca.server_cert(1, 2090);
    let mut volume = SecretVolume::new(&first, &dev_ca);
    let tls = volume.tls_config(1);
    let srv = TestServer::builder().dev_dir(dev.path()).configure(move |raw| raw.tls = Some(tls)).start().await;
    tracing::callsite::rebuild_interest_cache();
    let order = dev_client(dev.path(), &[&ca.cert_pem], "order");
    let (tls, _) = connect(&srv, &order).await.unwrap();
    let mut open = RawH2::over(tls).await;

    // A new certificate with someone else's key.
    let (second, stray) = (ca.server_cert(2, 2091), ca.server_cert(3, 2091));
    volume.update_raw(&second.cert_pem, &stray.key_pem, &dev_ca);
    let key_path = volume.path("tls.key").display().to_string();
    let refused = |text: &str| {
        text.lines()
            .filter(|l| l.contains("TLS files not reloaded") && l.contains(&format!("tls.key: {key_path}")))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    within("the refusal in the log", async {
        while refused(&captured.text()).is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let line = &refused(&captured.text())[0];
    let cert_path = volume.path("tls.crt").display().to_string();
    assert!(line.contains(&format!("does not match the certificate in tls.cert ({cert_path})")), "{line}");
    // Still the first certificate, for new and open connections alike.
    let (tls, served) = connect(&srv, &order).await.unwrap();
    assert_eq!(served.serial, serial_of(&first));
    RawH2::over(tls).await.get_jwks().await;
    open.get_jwks().await;
    // A few more polls of the same broken files add no line; SIGHUP
    // reports it again, and keeps the running set too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(refused(&captured.text()).len(), 1, "a broken set is logged once per content");
    srv.reload().await.unwrap();
    assert_eq!(refused(&captured.text()).len(), 2);

    // An expired certificate (with its own key) is refused as well: the
    // running one is still good.
    let expired = ca.server_cert(4, 2021);
    volume.update(&expired, &dev_ca);
    let expired_refusal = |text: &str| {
        text.lines().any(|l| l.contains("TLS files not reloaded") && l.contains("expired at 2021-12-31T00:00:00Z"))
    };
    within("the expired certificate's refusal", async {
        while !expired_refusal(&captured.text()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (_, served) = connect(&srv, &order).await.unwrap();
    assert_eq!(served.serial, serial_of(&first));

    // The matching key arrives, with a client CA added: taken at the next
    // poll, and the change of who may connect is logged by name.
    let added = Ca::generate("added client CA").unwrap();
    volume.update(&second, &format!("{dev_ca}{}", added.cert_pem));
    let tls = until_served(&srv, &order, &serial_of(&second)).await;
    RawH2::over(tls).await.get_jwks().await;
    open.get_jwks().await;
    // The swap comes first, its log lines right after.
    let text = within("the reload's log lines", async {
        loop {
            let text = captured.text();
            if text.contains("client CAs changed") {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(text.contains("TLS files reloaded") && text.contains(&serial_of(&second)), "{text}");
    let change = text.lines().find(|l| l.contains("client CAs changed")).unwrap_or_else(|| panic!("{text}"));
    assert!(change.contains("CN=added client CA") && change.contains("removed=[]"), "{change}");
}

#[tokio::test]
async fn with_polling_off_sighup_reloads_the_tls_files() {
    let dev = dev_dir();
    let dev_ca = read(dev.path().join("ca.pem"));
    let ca = ServingCa::new("serving CA");
    let first = ca.server_cert(1, 2090);
    let mut volume = SecretVolume::new(&first, &dev_ca);
    let tls = volume.tls_config(0);
    let srv = TestServer::builder().dev_dir(dev.path()).configure(move |raw| raw.tls = Some(tls)).start().await;
    let order = dev_client(dev.path(), &[&ca.cert_pem], "order");

    let second = ca.server_cert(2, 2091);
    volume.update(&second, &dev_ca);
    let (_, served) = connect(&srv, &order).await.unwrap();
    assert_eq!(served.serial, serial_of(&first), "no poll: the files wait for SIGHUP");
    srv.reload().await.unwrap();
    let (tls, served) = connect(&srv, &order).await.unwrap();
    assert_eq!(served.serial, serial_of(&second));
    RawH2::over(tls).await.get_jwks().await;
}

async fn readyz(srv: &TestServer) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = TcpStream::connect(srv.http_addr).await.unwrap();
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default())
}

async fn grpc_health(client: &mut HealthClient<tonic::transport::Channel>) -> ServingStatus {
    let req = HealthCheckRequest { service: "auth.v1.Auth".into() };
    client.check(req).await.unwrap().into_inner().status()
}

#[tokio::test(flavor = "current_thread")]
async fn an_expired_server_certificate_makes_the_replica_not_ready_and_warnings_come_ahead_of_it() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt().with_writer(captured.clone()).with_ansi(false).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    let dev = dev_dir();
    let dev_ca = read(dev.path().join("ca.pem"));
    let ca = ServingCa::new("serving CA");
    let cert = ca.server_cert(7, 2090);
    let not_after = {
        let der = CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap();
        CertInfo::from_der(der.as_ref()).unwrap().not_after
    };
    let volume = SecretVolume::new(&cert, &dev_ca);
    let tls = volume.tls_config(1);
    // The server's clock says three days are left; the client's (the
    // real one) finds the certificate valid throughout.
    let clock = Arc::new(ManualClock::new(u64::try_from(not_after).unwrap() - 3 * 86_400));
    let srv = TestServer::builder()
        .dev_dir(dev.path())
        .clock(clock.clone())
        .configure(move |raw| raw.tls = Some(tls))
        .start()
        .await;
    tracing::callsite::rebuild_interest_cache();

    let soon = |text: &str| text.lines().filter(|l| l.contains("server certificate expires soon")).count();
    assert_eq!(readyz(&srv).await.0, 200, "a certificate near its end still serves, ready");
    let first = captured.text();
    assert_eq!(soon(&first), 1, "one warning at start-up: {first}");
    assert!(first.contains("days_left=3") && first.contains("2090-12-31T00:00:00Z"), "{first}");
    let channel = tonic::transport::Channel::from_shared(format!("https://{}", srv.grpc_addr))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca.cert_pem))
                .identity(tonic::transport::Identity::from_pem(
                    read(dev.path().join("clients/admin.pem")),
                    read(dev.path().join("clients/admin-key.pem")),
                ))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    assert_eq!(grpc_health(&mut health).await, ServingStatus::Serving);

    // An hour on, the warning comes again.
    clock.advance(3_601);
    within("the repeated warning", async {
        while soon(&captured.text()) < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // Past notAfter: not ready on both probes, with the reason.
    clock.set(u64::try_from(not_after).unwrap() + 1);
    let serial = serial_of(&cert);
    let expected = format!("tls: server certificate (tls.cert, serial {serial}) expired at 2090-12-31T00:00:00Z");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, body) = readyz(&srv).await;
        if status == 503 {
            assert_eq!(body, expected);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "readyz never reported the expired certificate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    within("gRPC health NOT_SERVING", async {
        while grpc_health(&mut health).await != ServingStatus::NotServing {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(captured.text().contains("server certificate has expired"));
    // The replica keeps serving what reaches it: readiness moves traffic.
    let mut auth = auth_proto::auth::v1::auth_client::AuthClient::new(channel);
    auth.get_jwks(auth_proto::auth::v1::GetJwksRequest {}).await.unwrap();

    // A renewed certificate makes it ready again, without a restart.
    let mut volume = volume;
    volume.update(&ca.server_cert(8, 2095), &dev_ca);
    within("ready again after the renewal", async {
        while readyz(&srv).await.0 != 200 || grpc_health(&mut health).await != ServingStatus::Serving {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// Runs the real binary on `config` until it exits, or until `stop_at`
/// appears on its standard output (then it is killed). Returns its exit
/// status (`None` when killed), standard output and error.
fn run_binary(config: &Path, stop_at: Option<&str>) -> (Option<std::process::ExitStatus>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_auth-server"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--log-format", "text"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the auth-server binary");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = stop_at.map(str::to_owned);
    std::thread::spawn(move || {
        let mut out = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let stop = stop.as_deref().is_some_and(|s| line.contains(s));
            out.push_str(&line);
            out.push('\n');
            if stop {
                break;
            }
        }
        let _ = tx.send(out);
    });
    let out = rx.recv_timeout(PATIENCE).expect("the binary neither exited nor logged what was awaited");
    let status = match child.try_wait().unwrap() {
        Some(status) => Some(status),
        None if stop_at.is_some_and(|s| out.contains(s)) => {
            child.kill().unwrap();
            let _ = child.wait();
            None
        }
        // Its output ended: it is exiting.
        None => Some(child.wait().unwrap()),
    };
    (status, out, err.join().unwrap())
}

#[test]
fn a_key_that_is_not_the_certificates_stops_the_binary_before_it_listens_naming_both_files() {
    let dev = dev_dir();
    let (key, cert) = (dev.path().join("server-key.pem"), dev.path().join("server.pem"));
    // Another certificate's key, in place of the server's.
    std::fs::copy(dev.path().join("clients/order-key.pem"), &key).unwrap();
    let (status, out, err) = run_binary(&dev.path().join("auth-server.toml"), None);
    let status = status.expect("the binary exits");
    assert!(!status.success(), "{out}{err}");
    assert!(!out.contains("listening"), "{out}");
    assert_eq!(
        err.trim(),
        format!(
            "auth-server: config: tls.key: {}: does not match the certificate in tls.cert ({}): the private key is \
             not the one the certificate was issued for; install the key and the certificate of the same issuance",
            key.display(),
            cert.display()
        )
    );
}

#[test]
fn key_files_other_users_can_read_stop_the_binary_unless_allowed() {
    let dev = dev_dir();
    let config = dev.path().join("auth-server.toml");
    let signing = dev.path().join("keys/signing.pem");
    std::fs::set_permissions(&signing, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, out, err) = run_binary(&config, None);
    assert!(!status.expect("the binary exits").success(), "{out}{err}");
    let shown = signing.display();
    assert!(err.contains(&format!("keys.signing.path: {shown} has mode 0644")), "{err}");
    assert!(err.contains(&format!("chmod 600 {shown}")) && err.contains("keys.allow_readable_key_files"), "{err}");

    // The TLS key too, named as such.
    std::fs::set_permissions(&signing, std::fs::Permissions::from_mode(0o600)).unwrap();
    let tls_key = dev.path().join("server-key.pem");
    std::fs::set_permissions(&tls_key, std::fs::Permissions::from_mode(0o604)).unwrap();
    let (status, _, err) = run_binary(&config, None);
    assert!(!status.expect("the binary exits").success());
    assert!(err.contains(&format!("tls.key: {} has mode 0604", tls_key.display())), "{err}");

    // The override starts it, with the warning.
    std::fs::set_permissions(&signing, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = read(&config).replace("[keys]\n", "[keys]\nallow_readable_key_files = true\n");
    std::fs::write(&config, text).unwrap();
    let (status, out, err) = run_binary(&config, Some("auth-server listening"));
    assert!(status.is_none(), "the binary stopped: {out}{err}");
    assert!(out.contains("auth-server listening"), "{out}{err}");
    for key in ["keys.signing.path", "tls.key"] {
        assert!(out.contains(&format!("{key}: ")) && out.contains("starting anyway"), "{out}");
    }
}

// ---------------------------------------------------------------------------
// The HTTP side port's `[http_tls]`, and what /metrics shows of both ports.

/// A client of the HTTPS side port trusting `trust` (no client certificate).
fn https_client(trust: &[&str]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in trust {
        roots.add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// `GET path` on an open HTTP/1.1 connection, which stays open for the
/// next request: the status and the body.
async fn get_on(conn: &mut TlsStream<TcpStream>, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut more = async |buf: &mut Vec<u8>| {
        let mut chunk = [0u8; 8192];
        let n = within("an HTTP response", conn.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "the connection closed mid-response: {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        more(&mut buf).await;
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("a status line: {head}"));
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("a content-length: {head}"));
    while buf.len() < head_end + length {
        more(&mut buf).await;
    }
    (status, String::from_utf8(buf[head_end..head_end + length].to_vec()).unwrap())
}

fn not_after_of(cert_pem: &str) -> i64 {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    CertInfo::from_der(der.as_ref()).unwrap().not_after
}

#[test]
fn a_side_port_key_that_is_not_the_certificates_stops_the_binary_before_it_listens_naming_both_files() {
    let dev = dev_dir();
    let config = dev.path().join("auth-server.toml");
    // The side port serves the dev server certificate, with another
    // certificate's key.
    let (key, cert) = (dev.path().join("http-key.pem"), dev.path().join("server.pem"));
    std::fs::copy(dev.path().join("clients/order-key.pem"), &key).unwrap();
    std::fs::write(&config, read(&config) + "\n[http_tls]\ncert = \"server.pem\"\nkey = \"http-key.pem\"\n").unwrap();
    let (status, out, err) = run_binary(&config, None);
    let status = status.expect("the binary exits");
    assert!(!status.success(), "{out}{err}");
    assert!(!out.contains("listening"), "{out}");
    assert_eq!(
        err.trim(),
        format!(
            "auth-server: config: http_tls.key: {}: does not match the certificate in http_tls.cert ({}): the private \
             key is not the one the certificate was issued for; install the key and the certificate of the same \
             issuance",
            key.display(),
            cert.display()
        )
    );

    // The certificate's own key, readable by other users: refused as
    // tls.key would be, naming http_tls.key.
    std::fs::copy(dev.path().join("server-key.pem"), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, out, err) = run_binary(&config, None);
    assert!(!status.expect("the binary exits").success(), "{out}{err}");
    assert!(!out.contains("listening"), "{out}");
    assert!(err.contains(&format!("http_tls.key: {} has mode 0644", key.display())), "{err}");
    assert!(err.contains(&format!("chmod 600 {}", key.display())), "{err}");
}

#[tokio::test]
async fn a_rotated_side_port_certificate_reaches_new_https_connections_while_open_ones_keep_working() {
    let dev = dev_dir();
    let dev_ca = read(dev.path().join("ca.pem"));
    let (old_ca, new_ca) = (ServingCa::new("side port CA 1"), ServingCa::new("side port CA 2"));
    let first = old_ca.server_cert(1, 2090);
    let mut volume = SecretVolume::new(&first, &dev_ca);
    let http_tls = volume.http_tls_config();
    let srv = TestServer::builder()
        .dev_dir(dev.path())
        .configure(move |raw| {
            raw.http_tls = Some(http_tls);
            // The side port's files are checked on [tls]'s schedule.
            raw.tls.as_mut().expect("the dev config's [tls]").reload_check_secs = 1;
        })
        .start()
        .await;
    let client = https_client(&[&old_ca.cert_pem, &new_ca.cert_pem]);
    let (mut open, served) = connect_to(srv.http_addr, &client).await.unwrap();
    assert_eq!(served.serial, serial_of(&first));
    assert_eq!(get_on(&mut open, "/healthz").await, (200, "ok".to_owned()));

    // cert-manager renews: a new key and a certificate from a new CA,
    // swapped in as the kubelet swaps a Secret volume. No SIGHUP: the poll
    // finds it.
    let second = new_ca.server_cert(2, 2091);
    volume.update(&second, &dev_ca);
    let mut fresh = until_served_at(srv.http_addr, &client, &serial_of(&second)).await;
    let (status, jwks) = get_on(&mut fresh, "/.well-known/jwks.json").await;
    assert_eq!(status, 200);
    assert!(jwks.contains("\"keys\""), "{jwks}");
    // The connection made before the renewal was never cut.
    assert_eq!(get_on(&mut open, "/healthz").await, (200, "ok".to_owned()));
    let (_, served) = connect_to(srv.http_addr, &client).await.unwrap();
    assert_eq!((served.serial, rfc3339(served.not_after)), (serial_of(&second), "2091-12-31T00:00:00Z".to_owned()));
    // A client trusting only the old CA is now refused.
    assert!(connect_to(srv.http_addr, &https_client(&[&old_ca.cert_pem])).await.is_err());
}

#[tokio::test(flavor = "current_thread")]
async fn an_expired_side_port_certificate_is_logged_as_http_tls_and_leaves_the_replica_ready() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt().with_writer(captured.clone()).with_ansi(false).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    let dev = dev_dir();
    let ca = ServingCa::new("side port CA");
    let cert = ca.server_cert(9, 2090);
    let volume = SecretVolume::new(&cert, &read(dev.path().join("ca.pem")));
    let http_tls = volume.http_tls_config();
    // The server's clock is past the side port's notAfter (the gRPC dev
    // certificate lasts far longer); the client's, the real one, is not.
    let clock = Arc::new(ManualClock::new(u64::try_from(not_after_of(&cert.cert_pem)).unwrap() + 1));
    let srv = TestServer::builder()
        .dev_dir(dev.path())
        .clock(clock)
        .configure(move |raw| raw.http_tls = Some(http_tls))
        .start()
        .await;
    tracing::callsite::rebuild_interest_cache();

    // The server checks the expiry as it starts serving.
    let expired = || captured.text().lines().find(|l| l.contains("server certificate has expired")).map(str::to_owned);
    let line = within("the expiry error", async {
        loop {
            if let Some(line) = expired() {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let serial = serial_of(&cert);
    assert!(line.contains("section=\"http_tls\"") || line.contains("section=http_tls"), "{line}");
    assert!(line.contains(&serial) && line.contains("2090-12-31T00:00:00Z"), "{line}");
    assert!(line.contains("readiness unchanged") && !line.contains("not ready"), "{line}");
    // Still ready, on the side port itself (over HTTPS) and on gRPC health.
    let (mut conn, _) = connect_to(srv.http_addr, &https_client(&[&ca.cert_pem])).await.unwrap();
    assert_eq!(get_on(&mut conn, "/readyz").await, (200, "ready".to_owned()));
    let mut health = HealthClient::new(srv.channel("admin").await);
    assert_eq!(grpc_health(&mut health).await, ServingStatus::Serving);
}

#[tokio::test]
async fn metrics_show_each_ports_certificate_expiry_and_its_tls_reloads_by_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ServingCa::new("side port CA");
    let first = ca.server_cert(1, 2090);
    // No client CA on the side port: the volume's ca.crt is not read.
    let mut volume = SecretVolume::new(&first, "");
    let extra = format!(
        "\n[http_tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        volume.path("tls.crt").display(),
        volume.path("tls.key").display()
    );
    let srv = AuthProcess::start(dir.path(), &extra).await;
    let client = https_client(&[&ca.cert_pem]);
    let scrape = async || {
        let (mut conn, _) = connect_to(srv.http, &client).await.unwrap();
        let (status, body) = get_on(&mut conn, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        Metrics::parse(&body)
    };
    let hup = || {
        let sent = Command::new("kill").args(["-HUP", &srv.child.id().to_string()]).status().unwrap();
        assert!(sent.success());
    };
    let (expiry, reloads) = ("auth_tls_certificate_expiry_timestamp_seconds", "auth_tls_reloads_total");
    let reloaded = |m: &Metrics, port: &str, outcome: &str| m.value(reloads, &[("port", port), ("outcome", outcome)]);

    let m = scrape().await;
    promtool_check(&m.text);
    let grpc_not_after = not_after_of(&read(dir.path().join("server.pem")));
    assert_eq!(m.value(expiry, &[("port", "grpc")]), grpc_not_after as f64);
    assert_eq!(m.value(expiry, &[("port", "http")]), not_after_of(&first.cert_pem) as f64);
    for port in ["grpc", "http"] {
        for outcome in ["applied", "rejected"] {
            assert_eq!(reloaded(&m, port, outcome), 0.0, "{port} {outcome}:\n{}", m.text);
        }
    }

    // Renewed, then SIGHUP: the next scrape shows the new notAfter.
    let second = ca.server_cert(2, 2095);
    volume.update(&second, "");
    hup();
    let m = within("the renewed certificate in /metrics", async {
        loop {
            let m = scrape().await;
            if m.value(expiry, &[("port", "http")]) == not_after_of(&second.cert_pem) as f64 {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!((reloaded(&m, "http", "applied"), reloaded(&m, "http", "rejected")), (1.0, 0.0));
    assert_eq!(m.value(expiry, &[("port", "grpc")]), grpc_not_after as f64);
    assert_eq!((reloaded(&m, "grpc", "applied"), reloaded(&m, "grpc", "rejected")), (0.0, 0.0));

    // A broken set (a certificate with the running key) is refused and
    // counted; the gauge keeps the running certificate's notAfter.
    let stray = ca.server_cert(3, 2099);
    volume.update_raw(&stray.cert_pem, &second.key_pem, "");
    let refusals = || srv.printed().lines().filter(|l| l.contains("TLS files not reloaded")).count();
    hup();
    let m = within("the refusal in /metrics", async {
        loop {
            let m = scrape().await;
            if reloaded(&m, "http", "rejected") > 0.0 {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!((reloaded(&m, "http", "applied"), reloaded(&m, "http", "rejected")), (1.0, 1.0));
    assert_eq!(m.value(expiry, &[("port", "http")]), not_after_of(&second.cert_pem) as f64);
    // SIGHUP on the same broken files logs the refusal again, but counts
    // one broken set once.
    let logged = within("the refusal in the log", async {
        loop {
            let n = refusals();
            if n > 0 {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    hup();
    within("the second refusal in the log", async {
        while refusals() <= logged {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let m = scrape().await;
    assert_eq!((reloaded(&m, "http", "applied"), reloaded(&m, "http", "rejected")), (1.0, 1.0));
    promtool_check(&m.text);
}
