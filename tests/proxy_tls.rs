//! mTLS between proxies, authorization by identity, certificate rotation
//! and the hardened edges, with real sockets and certificates made here
//! (rcgen): a client talks plain HTTP to proxy A, which connects over mTLS
//! to proxy B's inbound `tls` listener, which forwards to a backend.

// Helpers may panic too: in a test, a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use support::pki::{Ca, Leaf, TRUST_DOMAIN};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The three PEM files of a proxy-level `tls` key, in a temp dir.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(ca: &Ca, leaf: &Leaf) -> Files {
        let files = Files {
            dir: tempfile::tempdir().unwrap(),
        };
        files.write(ca, leaf);
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes (or rewrites) the files: each to a temp name, then renamed,
    /// so a reader never sees half a file.
    fn write(&self, ca: &Ca, leaf: &Leaf) {
        for (name, text) in [
            ("ca.pem", &ca.pem),
            ("cert.pem", &leaf.cert),
            ("key.pem", &leaf.key),
        ] {
            let tmp = self.path(&format!("{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.path(name)).unwrap();
        }
    }

    fn yaml(&self) -> String {
        format!(
            "tls: {{ cert: \"{}\", key: \"{}\", ca: \"{}\" }}\n",
            self.path("cert.pem").display(),
            self.path("key.pem").display(),
            self.path("ca.pem").display()
        )
    }
}

/// Proxy B: an inbound `tls` listener for `orders` in front of `backend`.
async fn inbound_proxy(files: &Files, backend: SocketAddr, extra: &str) -> TestProxy {
    let yaml = format!(
        "admin: 127.0.0.1:0\n{tls}limits: {{ header_timeout: 1s }}\nlisteners:\n  \
         - {{ bind: 127.0.0.1:0, service: orders, direction: inbound, tls: true{extra} }}\n  \
         - {{ bind: 127.0.0.1:0, service: orders }}\n\
         services:\n  orders:\n    endpoints: [{{ addr: \"{backend}\" }}]\n",
        tls = files.yaml()
    );
    TestProxy::start(&yaml).await
}

/// Proxy A: a plain outbound listener for `orders`, sent over mTLS to
/// proxy B at `remote`.
async fn outbound_proxy(files: &Files, remote: SocketAddr, protocol: &str) -> TestProxy {
    let yaml = format!(
        "admin: 127.0.0.1:0\n{tls}listeners:\n  - {{ bind: 127.0.0.1:0, service: orders }}\n\
         services:\n  orders:\n    protocol: {protocol}\n    retries: {{ attempts: 0 }}\n    \
         tls: {{ server_name: orders }}\n    endpoints: [{{ addr: \"{remote}\" }}]\n",
        tls = files.yaml()
    );
    TestProxy::start(&yaml).await
}

/// A rustls client config trusting `ca`, with `leaf` as client cert if any.
fn client_config(ca: &Ca, leaf: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match leaf {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection to `addr` (server name `orders`).
async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("orders").unwrap();
    within(
        "tls connect",
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
}

/// Sends a raw HTTP/1.1 request over TLS and reads until the server
/// closes or errors; returns what arrived.
async fn raw_tls_exchange(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    head: &[u8],
) -> Vec<u8> {
    let Ok(mut tls) = tls_connect(addr, config).await else {
        return Vec::new();
    };
    let _ = tls.write_all(head).await;
    let _ = tls.flush().await;
    let mut got = Vec::new();
    let _ = within("tls read", tls.read_to_end(&mut got)).await;
    got
}

/// Does a request from a client through A (plain) reach the backend via B?
async fn through(a: &TestProxy) -> Reply {
    get_h1(a.addr(), "orders", "/hello").await
}

#[tokio::test]
async fn mtls_request_flows_between_proxies_over_http1_and_h2() {
    let backend = Backend::start("b").await;
    let ca = Ca::new("mesh CA");
    let b_files = Files::new(&ca, &ca.leaf("orders"));
    let a_files = Files::new(&ca, &ca.leaf("web"));
    let b = inbound_proxy(&b_files, backend.addr, "").await;
    for protocol in ["http1", "http2"] {
        let a = outbound_proxy(&a_files, b.listeners[0], protocol).await;
        let reply = through(&a).await;
        assert_eq!(reply.status, 200, "{protocol}: {}", reply.text());
        assert_eq!(reply.backend(), "b");
        a.shutdown().await;
    }
    assert_eq!(backend.count(), 2);
    // B counted the requests as inbound.
    let metrics = b.admin_get("/metrics").await.text();
    let inbound = metric(
        &metrics,
        "almond_requests_total",
        &[("direction", "inbound"), ("service", "orders")],
    );
    assert_eq!(inbound, 2.0, "{metrics}");
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let backend = Backend::start("b").await;
    let ca = Ca::new("mesh CA");
    let rogue = Ca::new("rogue CA");
    let b = inbound_proxy(&Files::new(&ca, &ca.leaf("orders")), backend.addr, "").await;
    // A trusts B's CA but presents a certificate B does not trust.
    let a_files = Files::new(&ca, &rogue.leaf("web"));
    let a = outbound_proxy(&a_files, b.listeners[0], "http1").await;
    let reply = through(&a).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    // And a proxy that trusts another CA refuses B's server certificate.
    let c_files = Files::new(&rogue, &rogue.leaf("web"));
    let c = outbound_proxy(&c_files, b.listeners[0], "http1").await;
    assert_eq!(through(&c).await.status, 502);
    assert_eq!(backend.count(), 0);
}

/// Two services at one address with other TLS server names never share a
/// connection: `users` must not ride on the connection `orders` opened to
/// a server whose certificate names only `orders`.
#[tokio::test]
async fn services_at_one_address_with_other_server_names_do_not_share_connections() {
    for protocol in ["http2", "http1"] {
        let backend = Backend::start("b").await;
        let ca = Ca::new("mesh CA");
        let b = inbound_proxy(&Files::new(&ca, &ca.leaf("orders")), backend.addr, "").await;
        let files = Files::new(&ca, &ca.leaf("web"));
        let remote = b.listeners[0];
        let service = |name: &str| {
            format!(
                "  {name}:\n    protocol: {protocol}\n    retries: {{ attempts: 0 }}\n    \
                 tls: {{ server_name: {name} }}\n    endpoints: [{{ addr: \"{remote}\" }}]\n"
            )
        };
        let yaml = format!(
            "admin: 127.0.0.1:0\n{tls}listeners:\n  - {{ bind: 127.0.0.1:0 }}\nservices:\n{}{}",
            service("orders"),
            service("users"),
            tls = files.yaml()
        );
        let a = TestProxy::start(&yaml).await;
        let mut client = H1::connect(a.addr()).await;
        let reply = client.get("orders", "/hello").await;
        assert_eq!(reply.status, 200, "{protocol}: {}", reply.text());
        let reply = client.get("users", "/hello").await;
        assert_eq!(
            reply.status,
            502,
            "{protocol}: users got through: {}",
            reply.text()
        );
        assert_eq!(reply.header("x-almond-error"), Some("connect"));
        assert_eq!(backend.count(), 1, "{protocol}: only orders reached it");
    }
}

#[tokio::test]
async fn a_server_certificate_for_another_name_is_refused() {
    let backend = Backend::start("b").await;
    let ca = Ca::new("mesh CA");
    // B's certificate names `users`; A expects `orders`.
    let b = inbound_proxy(&Files::new(&ca, &ca.leaf("users")), backend.addr, "").await;
    let a = outbound_proxy(&Files::new(&ca, &ca.leaf("web")), b.listeners[0], "http1").await;
    let reply = through(&a).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.header("x-almond-error"), Some("connect"));
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let backend = Backend::start("b").await;
    let ca = Ca::new("mesh CA");
    let b = inbound_proxy(&Files::new(&ca, &ca.leaf("orders")), backend.addr, "").await;
    let a_files = Files::new(&ca, &ca.leaf_with("web", true));
    let a = outbound_proxy(&a_files, b.listeners[0], "http1").await;
    let reply = through(&a).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let backend = Backend::start("b").await;
    let ca = Ca::new("mesh CA");
    let b = inbound_proxy(&Files::new(&ca, &ca.leaf("orders")), backend.addr, "").await;
    let got = raw_tls_exchange(
        b.listeners[0],
        client_config(&ca, None),
        b"GET / HTTP/1.1\r\nhost: orders\r\n\r\n",
    )
    .await;
    assert!(
        !got.starts_with(b"HTTP/1.1"),
        "answered without a client certificate: {}",
        String::from_utf8_lossy(&got)
    );
    // Plain HTTP on the TLS port gets nowhere either.
    let plain = raw_exchange(b.listeners[0], b"GET / HTTP/1.1\r\nhost: orders\r\n\r\n").await;
    assert!(!plain.starts_with(b"HTTP/1.1"));
    assert_eq!(backend.count(), 0);
    eventually("both failed handshakes are counted", || async {
        let metrics = b.admin_get("/metrics").await.text();
        metric(&metrics, "almond_tls_handshake_failures_total", &[]) == 2.0
    })
    .await;
    // The same client with a certificate is served.
    let ok = raw_tls_exchange(
        b.listeners[0],
        client_config(&ca, Some(&ca.leaf("web"))),
        b"GET / HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        ok.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&ok)
    );
    assert_eq!(backend.count(), 1);
}

/// Sends raw bytes over plain TCP and reads until close.
async fn raw_exchange(addr: SocketAddr, head: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(head).await;
    let mut got = Vec::new();
    let _ = within("raw read", tcp.read_to_end(&mut got)).await;
    got
}

#[tokio::test]
async fn only_allowed_identities_reach_the_service() {
    let backend = Backend::start("b").await;
    let ca = Ca::new("mesh CA");
    let allow = format!(", allow: [\"{TRUST_DOMAIN}/web\", \"dns:billing\"]");
    let b = inbound_proxy(&Files::new(&ca, &ca.leaf("orders")), backend.addr, &allow).await;

    // By URI SAN.
    let web = outbound_proxy(&Files::new(&ca, &ca.leaf("web")), b.listeners[0], "http2").await;
    assert_eq!(through(&web).await.status, 200);
    // By DNS SAN / CN.
    let billing = outbound_proxy(
        &Files::new(&ca, &ca.leaf("billing")),
        b.listeners[0],
        "http1",
    )
    .await;
    assert_eq!(through(&billing).await.status, 200);
    assert_eq!(backend.count(), 2);

    // A verified client whose identity is not listed.
    let other = outbound_proxy(&Files::new(&ca, &ca.leaf("ads")), b.listeners[0], "http1").await;
    let reply = through(&other).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(reply.header("x-almond-error"), Some("forbidden"));
    assert_eq!(backend.count(), 2, "a denied request reached the backend");
    // Straight to the inbound listener: the 403 is an answer as any other,
    // with its request ID (and its access log line, span, tap summary).
    let raw = raw_tls_exchange(
        b.listeners[0],
        client_config(&ca, Some(&ca.leaf("ads"))),
        b"GET / HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n",
    )
    .await;
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 403"), "{raw}");
    assert!(raw.contains("x-request-id: "), "{raw}");
    assert_eq!(backend.count(), 2, "a denied request reached the backend");
    let metrics = b.admin_get("/metrics").await.text();
    assert_eq!(
        metric(&metrics, "almond_tls_denied_requests_total", &[]),
        2.0
    );
}

/// A route rule does not carry a request past the allow-list of the
/// service it was addressed to: `orders` admits only `web`, and its rule
/// sends `/admin` to `orders-admin` (no list of its own); `ads` is refused
/// there too, `web` is let through.
#[tokio::test]
async fn a_route_rule_does_not_bypass_the_addressed_service_s_allow_list() {
    let (orders, admin) = (
        Backend::start("orders").await,
        Backend::start("admin").await,
    );
    let ca = Ca::new("mesh CA");
    let files = Files::new(&ca, &ca.leaf("orders"));
    let yaml = format!(
        "admin: 127.0.0.1:0\n{tls}listeners:\n  \
         - {{ bind: 127.0.0.1:0, service: orders, direction: inbound, tls: true }}\n\
         services:\n  orders:\n    authz: {{ allow: [\"{TRUST_DOMAIN}/web\"] }}\n    \
         endpoints: [{{ addr: \"{o}\" }}]\n    \
         routes: [ {{ match: {{ path_prefix: /admin }}, to: {{ service: orders-admin }} }} ]\n  \
         orders-admin:\n    endpoints: [{{ addr: \"{a}\" }}]\n",
        tls = files.yaml(),
        o = orders.addr,
        a = admin.addr,
    );
    let b = TestProxy::start(&yaml).await;
    let ads = outbound_proxy(&Files::new(&ca, &ca.leaf("ads")), b.listeners[0], "http1").await;
    let reply = get_h1(ads.addr(), "orders", "/admin/users").await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    let web = outbound_proxy(&Files::new(&ca, &ca.leaf("web")), b.listeners[0], "http1").await;
    let reply = get_h1(web.addr(), "orders", "/admin/users").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!((orders.count(), admin.count()), (0, 1));
}

/// A `tls` listener left at the default `direction` (outbound) still
/// takes calls from other hosts' proxies: the service's allow-list holds
/// there too (it was enforced on `direction: inbound` alone, so `ads` got
/// through).
#[tokio::test]
async fn an_allow_list_holds_on_a_tls_listener_whatever_its_direction() {
    let orders = Backend::start("orders").await;
    let ca = Ca::new("mesh CA");
    let files = Files::new(&ca, &ca.leaf("orders"));
    let yaml = format!(
        "admin: 127.0.0.1:0\n{tls}listeners:\n  \
         - {{ bind: 127.0.0.1:0, service: orders, tls: true }}\n\
         services:\n  orders:\n    authz: {{ allow: [\"{TRUST_DOMAIN}/web\"] }}\n    \
         endpoints: [{{ addr: \"{o}\" }}]\n",
        tls = files.yaml(),
        o = orders.addr,
    );
    let b = TestProxy::start(&yaml).await;
    let ads = outbound_proxy(&Files::new(&ca, &ca.leaf("ads")), b.listeners[0], "http1").await;
    let reply = get_h1(ads.addr(), "orders", "/").await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    let web = outbound_proxy(&Files::new(&ca, &ca.leaf("web")), b.listeners[0], "http1").await;
    let reply = get_h1(web.addr(), "orders", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(orders.count(), 1);
}

#[tokio::test]
async fn certificates_rotate_under_load_without_failed_requests() {
    let backend = Backend::start("b").await;
    let ca = Ca::new("mesh CA");
    let b_files = Files::new(&ca, &ca.leaf("orders"));
    let b = inbound_proxy(&b_files, backend.addr, "").await;
    let a_files = Files::new(&ca, &ca.leaf("web"));
    let a = outbound_proxy(&a_files, b.listeners[0], "http2").await;
    let client = client_config(&ca, Some(&ca.leaf("web")));
    let presented = |tls: &tokio_rustls::client::TlsStream<TcpStream>| {
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let before = presented(&tls_connect(b.listeners[0], client.clone()).await.unwrap());

    // A steady loop of requests, one connection each, through A and B.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, addr) = (stop.clone(), a.addr());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            let mut client = H1::connect(addr).await;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client.get("orders", "/").await.status.as_u16() {
                    200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };

    // Rotate both proxies' certificates (new keys too).
    let new_b = ca.leaf("orders");
    b_files.write(&ca, &new_b);
    a_files.write(&ca, &ca.leaf("web"));
    let new_der = CertificateDer::from_pem_slice(new_b.cert.as_bytes())
        .unwrap()
        .to_vec();
    let b_addr = b.listeners[0];
    eventually("B presents the new certificate", || {
        let client = client.clone();
        let new_der = new_der.clone();
        async move {
            let tls = tls_connect(b_addr, client).await.unwrap();
            presented(&tls) == new_der
        }
    })
    .await;
    assert_ne!(before, new_der);
    // A new connection from A (new identity too) works.
    let fresh = outbound_proxy(&a_files, b.listeners[0], "http1").await;
    assert_eq!(through(&fresh).await.status, 200);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = within("load loop", load).await.unwrap();
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok > 0);
}

/// Sends `head` one byte every 100 ms for up to 10 s; returns how long the
/// server let it go on before closing (None: never closed).
async fn drip<S: tokio::io::AsyncWrite + tokio::io::AsyncRead + Unpin>(
    mut s: S,
) -> Option<Duration> {
    let start = tokio::time::Instant::now();
    let head = b"GET / HTTP/1.1\r\nhost: orders\r\nx-slow: "
        .iter()
        .chain(std::iter::repeat(&b'a'));
    for byte in head.take(100) {
        if s.write_all(&[*byte]).await.is_err() || s.flush().await.is_err() {
            return Some(start.elapsed());
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => return Some(start.elapsed()), // an error response
            Err(_) => {}
        }
    }
    None
}

#[tokio::test]
async fn slowloris_is_cut_off_by_header_timeout_on_plain_and_tls_listeners() {
    let backend = Backend::start("b").await;
    let ca = Ca::new("mesh CA");
    let b = inbound_proxy(&Files::new(&ca, &ca.leaf("orders")), backend.addr, "").await;

    // Plain listener (header_timeout: 1s).
    let plain = drip(TcpStream::connect(b.listeners[1]).await.unwrap()).await;
    assert!(
        plain.is_some_and(|t| t < Duration::from_secs(5)),
        "plain: {plain:?}"
    );
    // TLS listener, after a good handshake.
    let tls = tls_connect(b.listeners[0], client_config(&ca, Some(&ca.leaf("web"))))
        .await
        .unwrap();
    let cut = drip(tls).await;
    assert!(
        cut.is_some_and(|t| t < Duration::from_secs(5)),
        "tls: {cut:?}"
    );
    // A client that never finishes the handshake.
    let mut stalled = TcpStream::connect(b.listeners[0]).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "handshake stall: {closed:?}"
    );
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn oversized_headers_get_431_over_tls() {
    let backend = Backend::start("b").await;
    let ca = Ca::new("mesh CA");
    let b = inbound_proxy(&Files::new(&ca, &ca.leaf("orders")), backend.addr, "").await;
    let big = "a".repeat(100 * 1024);
    let head = format!("GET / HTTP/1.1\r\nhost: orders\r\nx-big: {big}\r\n\r\n");
    let got = raw_tls_exchange(
        b.listeners[0],
        client_config(&ca, Some(&ca.leaf("web"))),
        head.as_bytes(),
    )
    .await;
    assert!(
        got.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&got[..got.len().min(200)])
    );
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn admin_config_redacts_the_key_and_binds_loopback_by_default() {
    let backend = Backend::start("b").await;
    let ca = Ca::new("mesh CA");
    let files = Files::new(&ca, &ca.leaf("orders"));
    let b = inbound_proxy(&files, backend.addr, "").await;
    let config = b.admin_get("/config").await.json();
    assert_eq!(config["tls"]["key"], "<redacted>");
    assert_eq!(
        config["tls"]["cert"],
        files.path("cert.pem").display().to_string()
    );
    assert!(!config.to_string().contains("key.pem"));
    let defaults = almond_config::load_proxy("{}", "t").unwrap();
    assert!(defaults.admin.ip().is_loopback());
}

#[tokio::test]
async fn check_config_refuses_tls_mistakes_by_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let no_identity = write(
        "a.yaml",
        "listeners:\n  - bind: 127.0.0.1:4143\n    tls: true\n",
    );
    let missing = write(
        "b.yaml",
        "tls: { cert: /nonexistent/cert.pem, key: /nonexistent/key.pem, ca: /nonexistent/ca.pem }\n",
    );
    for (file, want) in [(&no_identity, "listeners[0].tls"), (&missing, "tls.key")] {
        let out = almond()
            .arg("check-config")
            .arg(file)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(want), "{want} not in: {stderr}");
    }
}

/// This process's CPU time (user + system), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; the first after
    // the name is field 3. In clock ticks of 10 ms.
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let ticks = field(14) + field(15);
    Duration::from_millis(ticks * 10)
}

/// Figures for the docs, reported and never asserted: run with
/// `cargo test --release --test proxy_tls -- --ignored --nocapture`.
/// Client -> A -> (plain | mTLS) -> B -> backend, all in this process, so
/// CPU per request counts both proxies, the client and the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn figures_mtls_against_plaintext() {
    const REQUESTS: u32 = 4000;
    let backend = Backend::start("b").await;
    let ca = Ca::new("mesh CA");
    let b_files = Files::new(&ca, &ca.leaf("orders"));
    let b = inbound_proxy(&b_files, backend.addr, "").await;
    let a_files = Files::new(&ca, &ca.leaf("web"));
    let a_tls = outbound_proxy(&a_files, b.listeners[0], "http2").await;
    let plain_yaml = format!(
        "admin: 127.0.0.1:0\nlisteners:\n  - {{ bind: 127.0.0.1:0, service: orders }}\n\
         services:\n  orders:\n    protocol: http2\n    endpoints: [{{ addr: \"{}\" }}]\n",
        b.listeners[1]
    );
    let a_plain = TestProxy::start(&plain_yaml).await;
    for (name, a) in [
        ("plaintext", &a_plain),
        ("mtls", &a_tls),
        ("plaintext", &a_plain),
        ("mtls", &a_tls),
    ] {
        let mut client = H1::connect(a.addr()).await;
        for _ in 0..200 {
            client.get("orders", "/").await;
        }
        let (cpu, start) = (cpu_time(), tokio::time::Instant::now());
        let mut latencies = Vec::with_capacity(REQUESTS as usize);
        for _ in 0..REQUESTS {
            let t = tokio::time::Instant::now();
            assert_eq!(client.get("orders", "/").await.status, 200);
            latencies.push(t.elapsed());
        }
        let (cpu, wall) = (cpu_time() - cpu, start.elapsed());
        latencies.sort();
        println!(
            "{name}: {REQUESTS} sequential requests: p50 {:?} p99 {:?}, CPU {:?}/request, {:.0} req/s",
            latencies[latencies.len() / 2],
            latencies[latencies.len() * 99 / 100],
            cpu / REQUESTS,
            f64::from(REQUESTS) / wall.as_secs_f64()
        );
    }
    // Full TLS 1.3 handshakes (ECDSA P-256, client certificate), one client.
    let client = client_config(&ca, Some(&ca.leaf("web")));
    let (cpu, start) = (cpu_time(), tokio::time::Instant::now());
    let n = 500u32;
    for _ in 0..n {
        let mut tls = tls_connect(b.listeners[0], client.clone()).await.unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = tls.read_to_end(&mut got).await;
    }
    let wall = start.elapsed();
    println!(
        "handshakes (+1 request each): {:.0}/s on one connection at a time, CPU {:?} each (both ends)",
        f64::from(n) / wall.as_secs_f64(),
        (cpu_time() - cpu) / n
    );
}

/// Central authorization: proxy B serves `orders` inbound over mTLS and
/// follows a control plane; `almond authz` changes who may call it, and B
/// enforces each change as its snapshot arrives. Typed identities; the
/// last identity denied leaves nobody allowed, not everybody; changes need
/// the token and are in the audit trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authz_from_the_control_plane_is_enforced_by_inbound_listeners() {
    let backend = Backend::start("b").await;
    let registry = Registry::new();
    registry.service("orders", &[(backend.addr, "v1")]);
    std::env::set_var("ALMOND_T_AUTHZ_TOKEN", "authz-t0ken");
    let control = TestControl::start(&registry.control_yaml(Some("ALMOND_T_AUTHZ_TOKEN"))).await;
    let url = control.url();

    let ca = Ca::new("mesh CA");
    let b_files = Files::new(&ca, &ca.leaf("orders"));
    let yaml = format!(
        "admin: 127.0.0.1:0\ncontrol: {url}\ntoken_env: ALMOND_T_AUTHZ_TOKEN\n{tls}listeners:\n  \
         - {{ bind: 127.0.0.1:0, service: orders, direction: inbound, tls: true }}\n",
        tls = b_files.yaml()
    );
    let b = TestProxy::start(&yaml).await;
    eventually("B follows the control plane", || async {
        b.admin_get("/ready").await.status == http::StatusCode::OK
    })
    .await;
    let web = outbound_proxy(&Files::new(&ca, &ca.leaf("web")), b.listeners[0], "http1").await;
    let billing = outbound_proxy(
        &Files::new(&ca, &ca.leaf("billing")),
        b.listeners[0],
        "http1",
    )
    .await;
    // No central policy yet: every verified client.
    assert_eq!(through(&web).await.status, 200);
    assert_eq!(through(&billing).await.status, 200);

    let web_id = format!("{TRUST_DOMAIN}/web");
    let authz = |action: &'static str, id: String, token: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut args = vec!["authz".to_owned(), "orders".into(), action.into(), id];
            args.extend(["--control".into(), url]);
            if let Some(t) = token {
                args.extend(["--token".into(), t.into()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_ops(&args).await
        }
    };
    // Refused: no token; an untyped identity. Nothing changes.
    let (code, _, err) = authz("allow", web_id.clone(), None).await;
    assert_eq!(code, Some(1), "{err}");
    let (code, _, err) = authz("allow", "web".into(), Some("authz-t0ken")).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not typed"), "{err}");
    assert_eq!(through(&billing).await.status, 200);

    // Only web.
    let (code, out, err) = authz("allow", web_id.clone(), Some("authz-t0ken")).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&web_id), "{out}");
    eventually("billing is refused", || async {
        through(&billing).await.status == 403
    })
    .await;
    assert_eq!(through(&web).await.status, 200);

    // billing by its DNS name too; then web denied: billing alone.
    let (code, _, err) = authz("allow", "dns:billing".into(), Some("authz-t0ken")).await;
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = authz("deny", web_id.clone(), Some("authz-t0ken")).await;
    assert_eq!(code, Some(0), "{err}");
    eventually("web is refused, billing admitted", || async {
        through(&web).await.status == 403 && through(&billing).await.status == 200
    })
    .await;

    // The last one denied: nobody.
    let (code, out, err) = authz("deny", "dns:billing".into(), Some("authz-t0ken")).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("nobody"), "{out}");
    eventually("nobody is admitted", || async {
        through(&billing).await.status == 403
    })
    .await;
    assert_eq!(through(&web).await.status, 403);

    // Audited like splits.
    let history = control.service("orders").await["policy"]["history"].clone();
    let actions: Vec<(String, String)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["action"].as_str().unwrap().to_owned(),
                c["identity"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("authz allow".into(), web_id.clone()),
            ("authz allow".into(), "dns:billing".into()),
            ("authz deny".into(), web_id),
            ("authz deny".into(), "dns:billing".into()),
        ]
    );
}

#[tokio::test]
async fn untyped_allow_entries_are_refused_with_their_key() {
    let yaml = "admin: 127.0.0.1:0\ntls: { cert: c.pem, key: k.pem, ca: ca.pem }\nlisteners:\n  \
                - { bind: 127.0.0.1:0, service: orders, direction: inbound, tls: true, allow: [billing] }\n\
                services:\n  orders:\n    authz: { allow: [\"dns:\"] }\n    endpoints: [{ addr: \"127.0.0.1:1\" }]\n";
    let err = almond_config::load_proxy(yaml, "test")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("listeners[0].allow[0]") && err.contains("not typed"),
        "{err}"
    );
    assert!(err.contains("services.orders.authz.allow[0]"), "{err}");
}
