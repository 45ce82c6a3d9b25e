//! End to end: the client edge. Who the service is told called it
//! (`X-Forwarded-*` on inbound listeners), which client headers steer
//! routing (`x-almond-*` only where trusted), and the bounds on client
//! connections (`limits.max_connections`, idle keep-alive, the admin
//! listener's header timeout). Real sockets, real proxy, real backend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Request, StatusCode};
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (EOF or reset); `None` if it is still open
/// after `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(wait, read).await.ok().map(|()| got)
}

/// A backend `b`, and a proxy routing by host to it as service `svc`.
async fn svc_proxy() -> (Backend, TestProxy) {
    let backend = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("svc").at(backend.addr))
        .start()
        .await;
    (backend, proxy)
}

#[tokio::test]
async fn inbound_listeners_forward_the_peer_and_ignore_routing_headers() {
    let backend = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .listener("{ bind: 127.0.0.1:0, service: svc, direction: inbound }")
        .listener("{ bind: 127.0.0.1:0 }")
        .service(ServiceYaml::new("svc").at(backend.addr))
        .start()
        .await;
    let (inbound, outbound) = (proxy.listeners[0], proxy.listeners[1]);

    // Inbound: the peer is appended, the proto set; a forged pin and a
    // forged error header do not reach routing or the service.
    let mut client = H1::connect(inbound).await;
    let req = Request::builder()
        .uri("/who")
        .header("host", "svc")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-almond-subset", "nosuch")
        .header("x-almond-error", "forged")
        .body(empty())
        .unwrap();
    let reply = client.request(req).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = backend.last();
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert!(
        seen.headers
            .keys()
            .all(|k| !k.as_str().starts_with("x-almond-")),
        "{seen:?}"
    );

    // A client's `Connection` cannot name away what the proxy adds (the
    // peer an app may trust) nor the target's `Host`.
    let req = Request::builder()
        .uri("/named-away")
        .header("host", "svc")
        .header(
            "connection",
            "keep-alive, X-Forwarded-For, x-forwarded-proto, host, x-extra",
        )
        .header("x-extra", "hop")
        .body(empty())
        .unwrap();
    let reply = client.request(req).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = backend.last();
    assert_eq!(seen.path, "/named-away");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1", "{seen:?}");
    assert_eq!(seen.headers["x-forwarded-proto"], "http", "{seen:?}");
    assert_eq!(seen.headers["host"], "svc", "{seen:?}");
    assert!(seen.headers.get("x-extra").is_none(), "{seen:?}");

    // Outbound on loopback (the local app): the pin is acted on, and
    // nothing is added.
    let mut client = H1::connect(outbound).await;
    let req = Request::builder()
        .uri("/pinned")
        .header("host", "svc")
        .header("x-almond-subset", "nosuch")
        .body(empty())
        .unwrap();
    let reply = client.request(req).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("x-almond-error"), Some("unknown-subset"));
    let reply = client.get("svc", "/plain").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(backend.last().headers.get("x-forwarded-for").is_none());
}

#[tokio::test]
async fn trust_routing_headers_can_be_set_per_listener() {
    let backend = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .listener("{ bind: 127.0.0.1:0, trust_routing_headers: false }")
        .service(ServiceYaml::new("svc").at(backend.addr))
        .start()
        .await;
    let mut client = H1::connect(proxy.addr()).await;
    let req = Request::builder()
        .uri("/")
        .header("host", "svc")
        .header("x-almond-subset", "nosuch")
        .body(empty())
        .unwrap();
    assert_eq!(client.request(req).await.status, StatusCode::OK);
}

#[tokio::test]
async fn connections_over_max_connections_are_closed_and_counted() {
    let backend = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .top("limits: { max_connections: 3 }")
        .by_host()
        .service(ServiceYaml::new("svc").at(backend.addr))
        .start()
        .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = H1::connect(proxy.addr()).await;
        assert_eq!(c.get("svc", "/").await.status, StatusCode::OK);
        held.push(c);
    }
    // The fourth is accepted and closed at once, answered nothing.
    let mut fourth = TcpStream::connect(proxy.addr()).await.unwrap();
    let _ = fourth
        .write_all(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let got = closed_within(&mut fourth, Duration::from_secs(5)).await;
    assert_eq!(got.as_deref(), Some(&b""[..]), "closed without an answer");
    let metrics = proxy.admin_get("/metrics").await.text();
    assert_eq!(
        metric(&metrics, "almond_connections_refused_total", &[]),
        1.0
    );

    // One closes: a new connection gets its place.
    drop(held.pop());
    eventually("a place is free again", || async {
        let answer = raw(
            proxy.addr(),
            b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
        )
        .await;
        answer.starts_with("HTTP/1.1 200 ")
    })
    .await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_header_timeout() {
    let backend = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .top("limits: { header_timeout: 300ms }")
        .by_host()
        .service(ServiceYaml::new("svc").at(backend.addr))
        .start()
        .await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await
        .unwrap();
    let got = closed_within(&mut stream, Duration::from_secs(5)).await;
    let got = String::from_utf8_lossy(got.as_deref().expect("closed while idle"));
    assert!(
        got.starts_with("HTTP/1.1 200 "),
        "answered, then closed: {got}"
    );
}

#[tokio::test]
async fn the_admin_listener_closes_a_slow_request_head() {
    let (_backend, proxy) = svc_proxy().await;
    let mut stream = TcpStream::connect(proxy.admin).await.unwrap();
    // Half a head, never finished (slowloris): closed after 10 s.
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let got = closed_within(&mut stream, Duration::from_secs(20)).await;
    assert!(
        got.is_some(),
        "the admin connection is still open after 20 s"
    );
    // And the admin listener still answers.
    assert_eq!(proxy.admin_get("/live").await.status, StatusCode::OK);
}

#[tokio::test]
async fn limit_mistakes_name_the_key() {
    for (limits, key) in [
        ("{ max_connections: 0 }", "limits.max_connections"),
        ("{ keep_alive_interval: 0s }", "limits.keep_alive_interval"),
    ] {
        let yaml = ProxyYaml::new()
            .top(&format!("limits: {limits}"))
            .by_host()
            .service(ServiceYaml::new("svc").at(closed_port().await))
            .build();
        let err = almond_config::load_proxy(&yaml, "test")
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{limits}: {err}");
    }
    // Limits whose 0 would quietly mean "never", and keys of a control
    // plane link with none to follow: refused, named.
    for (top, key) in [
        ("cache: /tmp/almond-snapshot.json", "cache"),
        ("token_env: ALMOND_T_UNUSED", "token_env"),
        (
            "control: http://127.0.0.1:4180\ncontrol_ca: /etc/ca.pem",
            "control_ca",
        ),
        ("control_max_bytes: 0", "control_max_bytes"),
        (
            "access_log: { max_per_second: 0 }",
            "access_log.max_per_second",
        ),
    ] {
        let yaml = ProxyYaml::new()
            .top(top)
            .by_host()
            .service(ServiceYaml::new("svc").at(closed_port().await))
            .build();
        let err = almond_config::load_proxy(&yaml, "test")
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{top}: {err}");
    }
    // The key the user wrote is the one named (max_ejection is left at
    // its default here).
    let yaml = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .at(closed_port().await)
                .set("circuit_breaker", "{ base_ejection: 10m }"),
        )
        .build();
    let err = almond_config::load_proxy(&yaml, "test")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("services.svc.circuit_breaker.base_ejection") && err.contains("max_ejection"),
        "{err}"
    );
}

/// A client that stops sending its request body: 408 after
/// `limits.body_idle`, whether the body was being kept for retries (small,
/// with a length) or streamed (chunked).
#[tokio::test]
async fn a_stalled_request_body_gets_408() {
    let backend = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .top("limits: { body_idle: 300ms }")
        .by_host()
        .service(ServiceYaml::new("svc").at(backend.addr))
        .start()
        .await;
    for head in [
        &b"POST /kept HTTP/1.1\r\nHost: svc\r\nContent-Length: 100\r\n\r\n0123456789"[..],
        &b"POST /streamed HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n"[..],
    ] {
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        stream.write_all(head).await.unwrap();
        let mut got = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut got))
            .await
            .expect("answered before 5 s")
            .unwrap();
        let answer = String::from_utf8_lossy(&got[..n]);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(answer.contains("x-almond-error: client-timeout"), "{answer}");
    }
    // Both answers are counted for the service, the kept body's too, as
    // the client's doing: a 4xx, not a failure of the service's.
    let metrics = proxy.admin_get("/metrics").await.text();
    let counted = metric(&metrics, "almond_requests_total", &[("service", "svc")]);
    assert_eq!(counted, 2.0, "{metrics}");
    let client = [
        ("service", "svc"),
        ("code_class", "4xx"),
        ("outcome", "success"),
    ];
    assert_eq!(
        metric(&metrics, "almond_requests_total", &client),
        2.0,
        "{metrics}"
    );
    let errors = metric(
        &metrics,
        "almond_upstream_errors_total",
        &[("service", "svc")],
    );
    assert_eq!(errors, 0.0, "{metrics}");
}

/// A kept upload still trickling in when `timeouts.request` is over: the
/// upstream never got a byte, so it is the client's 408, not the
/// service's 504 and upstream timeout.
#[tokio::test]
async fn an_upload_that_outlasts_the_request_timeout_is_the_clients_408() {
    let backend = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .at(backend.addr)
                .timeouts("1s", "1s"),
        )
        .start()
        .await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(b"POST /kept HTTP/1.1\r\nHost: svc\r\nContent-Length: 100\r\n\r\n")
        .await
        .unwrap();
    // A byte every 400 ms: never idle for body_idle, never done in time.
    let trickle = async {
        for _ in 0..10 {
            if stream.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    };
    tokio::time::timeout(Duration::from_millis(1500), trickle)
        .await
        .ok();
    let mut got = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut got))
        .await
        .expect("answered before 5 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&got[..n]);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert_eq!(backend.count(), 0, "nothing reached the upstream");
    let metrics = proxy.admin_get("/metrics").await.text();
    let errors = metric(
        &metrics,
        "almond_upstream_errors_total",
        &[("service", "svc")],
    );
    assert_eq!(errors, 0.0, "{metrics}");
    let failures = [("service", "svc"), ("outcome", "failure")];
    assert_eq!(
        metric(&metrics, "almond_requests_total", &failures),
        0.0,
        "{metrics}"
    );
}

/// Clients that give up before the answer (a deadline shorter than the
/// proxy's), over HTTP/1.1 and HTTP/2: each request is still counted, as
/// Nginx's 499 (a 4xx), with its time in the latency histogram; a hanging
/// upstream shows in p99 instead of in no metric at all.
#[tokio::test]
async fn requests_whose_clients_leave_are_counted() {
    let backend = Backend::builder("slow")
        .delay(Duration::from_secs(3))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let proxy = ProxyYaml::new()
        .by_host()
        .top(&format!(
            "access_log: {{ format: json, path: \"{}\" }}",
            log.display()
        ))
        .service(ServiceYaml::new("svc").at(backend.addr))
        .start()
        .await;
    for _ in 0..3 {
        let mut client = H1::connect(proxy.addr()).await;
        let gave_up =
            tokio::time::timeout(Duration::from_millis(300), client.get("svc", "/")).await;
        assert!(gave_up.is_err(), "answered before the client's deadline");
    }
    let mut client = H2::connect(proxy.addr()).await;
    let gave_up = tokio::time::timeout(Duration::from_millis(300), client.get("svc", "/")).await;
    assert!(gave_up.is_err(), "answered before the client's deadline");
    drop(client);
    let left = [("service", "svc"), ("code_class", "4xx")];
    eventually("the four requests are counted", || async {
        let metrics = proxy.admin_get("/metrics").await.text();
        metric(&metrics, "almond_requests_total", &left) == 4.0
    })
    .await;
    let metrics = proxy.admin_get("/metrics").await.text();
    let timed = [("service", "svc")];
    let count = metric(&metrics, "almond_request_duration_seconds_count", &timed);
    let sum = metric(&metrics, "almond_request_duration_seconds_sum", &timed);
    assert_eq!(count, 4.0, "{metrics}");
    assert!(sum >= 4.0 * 0.25, "each waited about 300 ms: {sum}");
    // The access log has them, as Nginx logs them: 499.
    eventually("four access log lines", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
            == 4
    })
    .await;
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(entry["status"], 499, "{line}");
        assert_eq!(entry["service"], "svc", "{line}");
    }
}

/// A client that stops reading its answer (64 MiB here) is not waited
/// for past `limits.body_idle` (Nginx's `send_timeout`): its connection
/// is closed, and the request ends (no longer in flight).
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_after_body_idle() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    const BIG: usize = 64 << 20;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n");
                let _ = s.write_all(head.as_bytes()).await;
                let chunk = vec![b'z'; 1 << 20];
                for _ in 0..64 {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    // Two seconds: long enough for the test to see the request in flight
    // (polled every 20 ms) before the proxy gives up on its client.
    let proxy = ProxyYaml::new()
        .top("limits: { body_idle: 2s }")
        .by_host()
        .service(ServiceYaml::new("big").at(addr))
        .start()
        .await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: big\r\n\r\n")
        .await
        .unwrap();
    // Reads nothing: the proxy's writes to it wait, then it gives up
    // after `body_idle` and the request is over.
    let in_flight = || async {
        let metrics = proxy.admin_get("/metrics").await.text();
        metric(&metrics, "almond_requests_in_flight", &[("service", "big")])
    };
    eventually("the request in flight", || async {
        in_flight().await == 1.0
    })
    .await;
    eventually("the request over", || async { in_flight().await == 0.0 }).await;
    // What was sent before the close arrives, then the end: far short of it all.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read_all)
        .await
        .expect("the connection was closed");
    assert!(got < BIG, "the whole answer arrived: {got} bytes");
}

/// An upstream that sends headers and part of a body, then nothing: the
/// response is ended after `timeouts.body_idle` and counted as a timeout.
#[tokio::test]
async fn a_stalled_response_body_is_ended_and_counted() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    .await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .at(addr)
                .set("timeouts", "{ body_idle: 300ms }"),
        )
        .start()
        .await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await
        .unwrap();
    let got = closed_within(&mut stream, Duration::from_secs(5))
        .await
        .expect("the stalled response was ended");
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    assert!(
        got.ends_with("0123456789"),
        "only what the upstream sent: {got}"
    );
    let metrics = proxy.admin_get("/metrics").await.text();
    let labels = [("service", "svc"), ("kind", "timeout")];
    assert_eq!(
        metric(&metrics, "almond_upstream_errors_total", &labels),
        1.0
    );
}

/// An upstream that answers every request with headers at once, then ten
/// body chunks 150 ms apart (1.5 s in all).
async fn slow_streamer() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
                    .await;
                for digit in b"0123456789" {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    let _ = s.write_all(&[*digit]).await;
                }
            });
        }
    });
    addr
}

/// HTTP/2 client connections: one with no stream for `idle_timeout` is
/// closed (GOAWAY) even though keep-alive PINGs flow on it; one with a
/// response still streaming is not, however long that takes.
#[tokio::test]
async fn idle_http2_connections_are_closed_busy_ones_are_not() {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let upstream = slow_streamer().await;
    let proxy = ProxyYaml::new()
        .top("limits: { idle_timeout: 500ms, keep_alive_interval: 100ms }")
        .by_host()
        .service(ServiceYaml::new("svc").at(upstream))
        .start()
        .await;
    let stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = conn.await;
        let _ = closed_tx.send(tokio::time::Instant::now());
    });

    // Busy: the body takes 1.5 s, three times the idle timeout; it all
    // arrives.
    let req = Request::builder()
        .uri("http://svc/slow")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"0123456789");
    let done = tokio::time::Instant::now();

    // Idle: closed by the proxy about `idle_timeout` after the last stream
    // ended, PINGs notwithstanding.
    let closed = tokio::time::timeout(Duration::from_secs(5), closed_rx)
        .await
        .expect("the idle connection was closed")
        .unwrap();
    let after = closed.duration_since(done);
    assert!(
        after >= Duration::from_millis(300),
        "closed {after:?} after the last stream: too early"
    );
}

/// A client's stream with the first `skip` bytes it writes dropped: they
/// were sent on the socket already, by hand.
struct Skip {
    inner: TcpStream,
    skip: usize,
}

impl tokio::io::AsyncRead for Skip {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Skip {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            self.skip -= n;
            return std::task::Poll::Ready(Ok(n));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A cleartext connection's protocol is told from its first bytes, read
/// without consuming them: the HTTP/2 preface sent in two pieces is still
/// HTTP/2; a POST whose first byte could begin the preface is HTTP/1.1; a
/// client that says nothing, or stops inside the preface, is closed after
/// `header_timeout` (it held one of `max_connections` for `idle_timeout`,
/// five minutes, before).
#[tokio::test]
async fn the_protocol_is_told_from_the_first_bytes_however_they_arrive() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let backend = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .top("limits: { header_timeout: 500ms }")
        .by_host()
        .service(ServiceYaml::new("svc").at(backend.addr))
        .start()
        .await;

    let head = b"PRI * HTTP/2.0\r\n";
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream.write_all(head).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let io = Skip {
        inner: stream,
        skip: head.len(),
    };
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("http://svc/h2")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);

    let mut post = TcpStream::connect(proxy.addr()).await.unwrap();
    post.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    post.write_all(
        b"OST /h1 HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    .await
    .unwrap();
    let got = closed_within(&mut post, Duration::from_secs(5)).await;
    let got = String::from_utf8_lossy(got.as_deref().expect("answered and closed"));
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    assert_eq!(backend.count(), 2);

    let mut silent = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut stalled = TcpStream::connect(proxy.addr()).await.unwrap();
    stalled.write_all(b"PRI * HTTP").await.unwrap();
    for stream in [&mut silent, &mut stalled] {
        let got = closed_within(stream, Duration::from_secs(5)).await;
        assert_eq!(got.as_deref(), Some(&b""[..]), "closed without an answer");
    }
}

/// An HTTP/1.1 request must name its host (RFC 9112 §3.2): without one it
/// is a 400, even on a listener bound to a service. An HTTP/1.0 request
/// may name none: its upstream request, HTTP/1.1, gets the service's name.
#[tokio::test]
async fn a_request_without_host_is_400_on_http11_and_named_on_http10() {
    let backend = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .listener("{ bind: 127.0.0.1:0, service: svc }")
        .service(ServiceYaml::new("svc").at(backend.addr))
        .start()
        .await;
    let bound = proxy.listeners[0];
    let answer = raw(bound, b"GET /no-host HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(backend.count(), 0);

    let answer = raw(bound, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    let seen = backend.last();
    assert_eq!(seen.path, "/old");
    assert_eq!(seen.headers["host"], "svc", "{seen:?}");
}

/// An HTTP/2 request may carry no `:authority` (nor `host`): on a
/// listener bound to a service, its upstream request names the service,
/// as an HTTP/1.0 one's does; an HTTP/1.1 upstream must get a `Host`
/// (RFC 9112 §3.2). (It got none.) The request is written frame by frame:
/// client libraries always send `:authority`.
#[tokio::test]
async fn an_h2_request_without_authority_names_the_service_upstream() {
    let backend = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .listener("{ bind: 127.0.0.1:0, service: svc }")
        .service(ServiceYaml::new("svc").at(backend.addr))
        .start()
        .await;
    let mut conn = TcpStream::connect(proxy.listeners[0]).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame.
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    // HEADERS on stream 1, END_STREAM | END_HEADERS: `:method GET`,
    // `:scheme http`, `:path /` from HPACK's static table, nothing else.
    out.extend_from_slice(&[0, 0, 3, 1, 0x5, 0, 0, 0, 1, 0x82, 0x86, 0x84]);
    conn.write_all(&out).await.unwrap();
    // Frames back until the response's HEADERS on stream 1.
    let status = within("the answer's HEADERS", async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            while got.len() >= 9 {
                let len =
                    usize::from(got[0]) << 16 | usize::from(got[1]) << 8 | usize::from(got[2]);
                if got.len() < 9 + len {
                    break;
                }
                let (kind, stream) = (got[3], u32::from_be_bytes([got[5], got[6], got[7], got[8]]));
                if kind == 1 && stream == 1 {
                    // The first field: `:status 200` is static index 8.
                    return got[9..9 + len].first().copied();
                }
                got.drain(..9 + len);
            }
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert_eq!(status, Some(0x88), "`:status 200`");
    let seen = backend.last();
    assert_eq!(seen.path, "/");
    assert_eq!(seen.headers["host"], "svc", "{seen:?}");
}

/// A client that writes its whole upload before it reads (as curl and
/// most HTTP libraries do) gets the answer the proxy made before taking
/// the upload (here a 404: no such service): the connection reads and
/// drops the rest before it closes, as nginx's lingering close does. (It
/// closed with the upload unread, so the rest of it was answered with a
/// reset: the client's write failed, and the answer could be lost.)
#[tokio::test]
async fn an_answer_made_before_the_upload_is_read_reaches_a_client_still_uploading() {
    /// More than the sockets' buffers hold between them on loopback.
    const UPLOAD: usize = 32 << 20;
    let (_backend, proxy) = svc_proxy().await;
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    let head = format!("POST /up HTTP/1.1\r\nHost: nosuch\r\nContent-Length: {UPLOAD}\r\n\r\n");
    let written = within("the whole upload written", async {
        conn.write_all(head.as_bytes()).await?;
        let chunk = vec![b'u'; 64 * 1024];
        for _ in 0..UPLOAD / chunk.len() {
            conn.write_all(&chunk).await?;
        }
        std::io::Result::Ok(())
    })
    .await;
    assert!(written.is_ok(), "the upload was cut off: {written:?}");
    let mut answer = Vec::new();
    within("the answer, then the close", conn.read_to_end(&mut answer))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer:?}");
    assert!(
        answer.contains("x-almond-error: unknown-service"),
        "{answer:?}"
    );
    // It says the connection ends with it.
    assert!(answer.contains("connection: close"), "{answer:?}");
}

/// `CONNECT` asks for a tunnel to a host:port, a forward proxy's work:
/// almond answers 501 itself and sends nothing upstream (it used to send
/// the service an invalid `CONNECT /`).
#[tokio::test]
async fn connect_is_answered_501_and_never_forwarded() {
    let (backend, proxy) = svc_proxy().await;
    let answer = raw(
        proxy.addr(),
        b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    assert!(answer.contains("x-almond-error: unsupported"), "{answer}");
    assert_eq!(backend.count(), 0);
}

/// A request whose head is not whole when the drain starts, and whose body
/// is still on its way when it is (so the lean server hands the
/// connection to hyper's with the drain already under way), is answered,
/// with `connection: close`: it was not dropped unanswered, as it was when
/// the drain closed the handed-off connection before hyper had read it.
#[tokio::test]
async fn a_request_half_read_when_the_drain_starts_is_answered() {
    let (backend, proxy) = svc_proxy().await;
    let addr = proxy.addr();
    let mut conns = Vec::new();
    for _ in 0..16 {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n")
            .await
            .unwrap();
        conns.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let admin = proxy.admin;
    let stopped = tokio::spawn(proxy.shutdown());
    eventually("the drain to start (/ready 503)", || async {
        admin_get(admin, "/ready").await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    for conn in &mut conns {
        conn.write_all(b"\r\n").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for conn in &mut conns {
        conn.write_all(b"0123456789").await.unwrap();
    }
    for (i, conn) in conns.iter_mut().enumerate() {
        let mut answer = Vec::new();
        within("the answer, then the close", conn.read_to_end(&mut answer))
            .await
            .unwrap_or_default();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 200 "),
            "connection {i}: {answer:?}"
        );
        assert!(
            answer.contains("connection: close"),
            "connection {i}: {answer:?}"
        );
    }
    within("the drain to end", stopped).await.unwrap();
    assert_eq!(backend.count(), 16);
}
