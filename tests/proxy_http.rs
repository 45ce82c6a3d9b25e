//! End to end over real sockets: protocols both ways, per-request
//! balancing over one client connection, routing, splits and pinning,
//! hop-by-hop headers, gRPC-style trailers and WebSocket upgrades.

mod support;

use http::{Request, StatusCode, Version};
use std::collections::HashMap;
use support::*;

/// A by-host proxy in front of one backend, as an HTTP/1.1 service `web1`
/// and an HTTP/2 service `web2`.
async fn both_protocols() -> (Backend, TestProxy) {
    let backend = Backend::start("web").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("web1").at(backend.addr))
        .service(ServiceYaml::new("web2").http2().at(backend.addr))
        .start()
        .await;
    (backend, proxy)
}

#[tokio::test]
async fn h1_to_h1_and_h2_to_h2_keep_target_and_host() {
    let (backend, proxy) = both_protocols().await;

    let path = "/a/b%20c?x=1&y=two&x=3";
    let reply = H1::connect(proxy.addr()).await.get("web1", path).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.backend(), "web");
    let seen = backend.last();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(
        seen.uri, path,
        "HTTP/1.1 target arrives in origin-form, unchanged"
    );
    assert_eq!(seen.authority.as_deref(), Some("web1"));

    let reply = H2::connect(proxy.addr()).await.get("web2", path).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.version, Version::HTTP_2);
    let seen = backend.last();
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(seen.path, path);
    assert_eq!(seen.authority.as_deref(), Some("web2"));
    assert!(
        seen.headers.get("host").is_none(),
        "no Host header beside :authority"
    );
}

#[tokio::test]
async fn h1_to_h2_and_h2_to_h1_translate_host_and_authority() {
    let (backend, proxy) = both_protocols().await;
    let path = "/orders/42?expand=items";

    // HTTP/1.1 client, HTTP/2 upstream: Host becomes :authority.
    let reply = H1::connect(proxy.addr()).await.get("web2:4140", path).await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = backend.last();
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(seen.path, path);
    assert_eq!(seen.authority.as_deref(), Some("web2:4140"));
    assert!(seen.headers.get("host").is_none());

    // h2c client, HTTP/1.1 upstream: :authority becomes Host, the target
    // becomes origin-form.
    let reply = H2::connect(proxy.addr()).await.get("web1", path).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.version, Version::HTTP_2);
    let seen = backend.last();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.uri, path);
    assert_eq!(seen.headers["host"], "web1");

    // The echo body agrees with what the backend recorded.
    let echo = reply.json();
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["path"], path);
}

/// Three backends behind one service with the given balancer.
async fn three_behind(lb: &str, protocol_h2: bool) -> (Vec<Backend>, TestProxy) {
    let mut backends = Vec::new();
    for name in ["a", "b", "c"] {
        backends.push(Backend::start(name).await);
    }
    let mut svc = ServiceYaml::new("pool").lb(lb);
    if protocol_h2 {
        svc = svc.http2();
    }
    for b in &backends {
        svc = svc.at(b.addr);
    }
    let proxy = ProxyYaml::new().by_host().service(svc).start().await;
    (backends, proxy)
}

#[tokio::test]
async fn round_robin_balances_each_request_of_one_h1_connection() {
    let (backends, proxy) = three_behind("round_robin", false).await;
    let mut client = H1::connect(proxy.addr()).await;
    for _ in 0..30 {
        assert_eq!(client.get("pool", "/").await.status, StatusCode::OK);
    }
    let counts: Vec<usize> = backends.iter().map(Backend::count).collect();
    // One keep-alive connection, yet every request is balanced on its own.
    assert_eq!(counts, vec![10, 10, 10]);
}

/// An HTTP/2 upstream that takes two streams at a time on a connection
/// (`SETTINGS_MAX_CONCURRENT_STREAMS`) gets another connection when more
/// requests are in flight, as Envoy opens one: they are not queued unseen
/// behind the first connection's two.
#[tokio::test]
async fn an_h2_upstream_at_its_stream_limit_gets_another_connection() {
    let backend = Backend::builder("api")
        .max_streams(2)
        .delay(std::time::Duration::from_millis(400))
        .start()
        .await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("api").http2().at(backend.addr))
        .start()
        .await;
    // The first connection, and its settings, are known.
    let reply = H1::connect(proxy.addr()).await.get("api", "/").await;
    assert_eq!(reply.status, StatusCode::OK);

    let replies = at_once(proxy.addr(), 6).await;
    assert!(replies.iter().all(|s| *s == StatusCode::OK), "{replies:?}");
    assert!(
        backend.peak_in_flight() > 2,
        "the backend answered {} at once: the requests waited behind one connection's two streams",
        backend.peak_in_flight()
    );
    assert!(
        backend.connections() >= 2,
        "{} connections",
        backend.connections()
    );
    // Each answer gave its stream back: more requests, one at a time,
    // fit on the connections open and open no more.
    let opened = backend.connections();
    let mut client = H1::connect(proxy.addr()).await;
    for _ in 0..8 {
        assert_eq!(client.get("api", "/").await.status, StatusCode::OK);
    }
    assert_eq!(backend.connections(), opened);
}

/// An HTTP/2 upstream at its stream limit that takes no second
/// connection (its listener gone, as at a per-client connection cap)
/// still answers: the request waits for a stream on the connection open,
/// as it did before another was ever opened, and the endpoint is not
/// ejected for the refused connect.
#[tokio::test]
async fn an_h2_upstream_that_takes_no_second_connection_answers_on_its_first() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        // Later connects are refused.
        drop(listener);
        let svc = hyper::service::service_fn(|_req| async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(full("ok")))
        });
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_concurrent_streams(1)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
            .await;
    });
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("api").http2().at(addr))
        .start()
        .await;
    // The connection, and its settings, are known.
    let reply = H1::connect(proxy.addr()).await.get("api", "/").await;
    assert_eq!(reply.status, StatusCode::OK);
    let replies = at_once(proxy.addr(), 3).await;
    assert!(replies.iter().all(|s| *s == StatusCode::OK), "{replies:?}");
    let reply = H1::connect(proxy.addr()).await.get("api", "/").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

/// An HTTP/2 connection to an upstream that carries no stream for
/// `timeouts.idle` is closed, as an idle HTTP/1.1 one is (the extra ones a
/// burst opened would otherwise stay, pinged, for good); the next request
/// opens another. One busy all along stays open.
#[tokio::test]
async fn an_idle_h2_upstream_connection_is_closed_after_timeouts_idle() {
    let backend = Backend::start("api").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("api")
                .http2()
                .at(backend.addr)
                .set("timeouts", "{ idle: 600ms }"),
        )
        .start()
        .await;
    let mut client = H1::connect(proxy.addr()).await;
    // A request every 100 ms for twice the idle limit: one
    // connection, kept.
    for _ in 0..12 {
        assert_eq!(client.get("api", "/").await.status, StatusCode::OK);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(backend.connections(), 1);
    assert_eq!(backend.open_connections(), 1);
    // Quiet: closed.
    eventually("the idle h2 connection closed", || async {
        backend.open_connections() == 0
    })
    .await;
    assert_eq!(client.get("api", "/").await.status, StatusCode::OK);
    assert_eq!(backend.connections(), 2);
}

#[tokio::test]
async fn p2c_ewma_spreads_the_requests_of_one_h2_connection() {
    let (backends, proxy) = three_behind("p2c_ewma", true).await;
    let client = H2::connect(proxy.addr()).await;
    // Batches of concurrent streams on the one connection.
    for _ in 0..10 {
        let mut batch = Vec::new();
        for _ in 0..6 {
            let mut c = client.clone();
            batch.push(tokio::spawn(async move { c.get("pool", "/").await.status }));
        }
        for t in batch {
            assert_eq!(t.await.unwrap(), StatusCode::OK);
        }
    }
    let counts: Vec<usize> = backends.iter().map(Backend::count).collect();
    assert_eq!(counts.iter().sum::<usize>(), 60);
    assert!(
        counts.iter().all(|&c| c > 0),
        "every endpoint gets traffic: {counts:?}"
    );
}

#[tokio::test]
async fn weighted_round_robin_gives_three_to_one() {
    let heavy = Backend::start("heavy").await;
    let light = Backend::start("light").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("w")
                .lb("round_robin")
                .endpoint(heavy.addr, "v1", 3)
                .endpoint(light.addr, "v1", 1),
        )
        .start()
        .await;
    let mut client = H1::connect(proxy.addr()).await;
    for _ in 0..40 {
        client.get("w", "/").await;
    }
    // The schedule has 4 slots (3 + 1), and 40 is ten whole rounds.
    assert_eq!((heavy.count(), light.count()), (30, 10));
}

#[tokio::test]
async fn bound_listener_ignores_host_and_host_listener_routes_by_name() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .bound_to("b")
        .service(ServiceYaml::new("a").at(a.addr))
        .service(ServiceYaml::new("b").at(b.addr))
        .start()
        .await;
    let (by_host, bound) = (proxy.listeners[0], proxy.listeners[1]);

    assert_eq!(get_h1(by_host, "a", "/").await.backend(), "a");
    assert_eq!(get_h1(by_host, "b", "/").await.backend(), "b");
    // A port in Host is not part of the service name.
    assert_eq!(get_h1(by_host, "a:8080", "/").await.backend(), "a");
    // The bound listener sends everything to `b`, whatever the Host says.
    assert_eq!(get_h1(bound, "a", "/").await.backend(), "b");
    assert_eq!(get_h1(bound, "nosuch", "/").await.backend(), "b");
    assert_eq!(H2::connect(bound).await.get("a", "/").await.backend(), "b");
}

#[tokio::test]
async fn unknown_service_is_404_naming_it() {
    let a = Backend::start("a").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("a").at(a.addr))
        .start()
        .await;

    let reply = get_h1(proxy.addr(), "nosuch:4140", "/").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.header("x-almond-error"), Some("unknown-service"));
    assert!(reply.text().contains("nosuch"), "{}", reply.text());

    let reply = H2::connect(proxy.addr()).await.get("ghost", "/").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.text().contains("ghost"), "{}", reply.text());
    assert_eq!(a.count(), 0);
}

/// Host names are case-insensitive: `Host: ORDERS` and `:authority:
/// Orders` reach service `orders` (service names are lower case; the
/// config check refuses others).
#[tokio::test]
async fn host_is_matched_in_any_case() {
    let a = Backend::start("a").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("orders").at(a.addr))
        .start()
        .await;
    for host in ["orders", "ORDERS", "Orders:4140"] {
        let reply = get_h1(proxy.addr(), host, "/").await;
        assert_eq!(reply.status, StatusCode::OK, "{host}: {}", reply.text());
    }
    let reply = H2::connect(proxy.addr()).await.get("Orders", "/").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(a.count(), 4);
}

/// Service `s` split 90/10 over subsets v1 (two endpoints) and v2.
async fn canary() -> (Backend, Backend, Backend, TestProxy) {
    let v1a = Backend::start("v1a").await;
    let v1b = Backend::start("v1b").await;
    let v2 = Backend::start("v2").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("s")
                .endpoint(v1a.addr, "v1", 1)
                .endpoint(v1b.addr, "v1", 1)
                .endpoint(v2.addr, "v2", 1)
                .split(&[("v1", 90), ("v2", 10)]),
        )
        .start()
        .await;
    (v1a, v1b, v2, proxy)
}

#[tokio::test]
async fn split_90_10_lands_within_a_binomial_bound() {
    let (v1a, v1b, v2, proxy) = canary().await;
    const N: usize = 2000;
    // Four keep-alive connections, N/4 requests each.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let addr = proxy.addr();
        tasks.push(tokio::spawn(async move {
            let mut c = H1::connect(addr).await;
            for _ in 0..N / 4 {
                assert_eq!(c.get("s", "/").await.status, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let canary = v2.count() as f64;
    assert_eq!(v1a.count() + v1b.count() + v2.count(), N);
    // Each request picks v2 with p = 0.1 independently, so the v2 count is
    // Binomial(2000, 0.1): mean 200, sigma = sqrt(2000 * 0.1 * 0.9) ~ 13.4.
    // A 5-sigma band (+-67) fails by chance about once in 1.7 million runs,
    // yet still catches a split that is off by a third.
    assert!(
        (canary - 200.0).abs() <= 5.0 * 13.42,
        "v2 got {canary} of {N}"
    );
    // v1's share is balanced over both of its endpoints.
    assert!(v1a.count() > 0 && v1b.count() > 0);
}

#[tokio::test]
async fn pinned_subset_gets_everything_and_the_pin_is_stripped() {
    let (v1a, v1b, v2, proxy) = canary().await;
    let mut client = H1::connect(proxy.addr()).await;
    for _ in 0..50 {
        let req = Request::get("/pinned")
            .header("host", "s")
            .header("x-almond-subset", "v2")
            .body(empty())
            .unwrap();
        let reply = client.request(req).await;
        assert_eq!(reply.backend(), "v2");
    }
    assert_eq!((v1a.count(), v1b.count(), v2.count()), (0, 0, 50));
    assert!(v2
        .seen()
        .iter()
        .all(|s| s.headers.get("x-almond-subset").is_none()));

    // h2 pins the same way.
    let mut h2 = H2::connect(proxy.addr()).await;
    let req = Request::get("http://s/pinned")
        .header("x-almond-subset", "v1")
        .body(empty())
        .unwrap();
    assert!(h2.request(req).await.backend().starts_with("v1"));
}

#[tokio::test]
async fn unknown_pinned_subset_is_503() {
    let (v1a, v1b, v2, proxy) = canary().await;
    let req = Request::get("/")
        .header("host", "s")
        .header("x-almond-subset", "v9")
        .body(empty())
        .unwrap();
    let reply = H1::connect(proxy.addr()).await.request(req).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("x-almond-error"), Some("unknown-subset"));
    assert!(reply.text().contains("v9"), "{}", reply.text());
    assert_eq!(v1a.count() + v1b.count() + v2.count(), 0);
}

/// An HTTP/2 client may split `Cookie` into fields; an HTTP/1.1 service
/// gets them as one line, joined by `; ` (RFC 9113 §8.2.3): a server that
/// reads only the first line would lose the session.
#[tokio::test]
async fn split_cookies_from_h2_reach_an_h1_service_as_one() {
    let backend = Backend::start("c").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("c").at(backend.addr))
        .start()
        .await;
    let req = Request::get("http://c/cookies")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(empty())
        .unwrap();
    let reply = H2::connect(proxy.addr()).await.request(req).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = backend.last();
    let cookies: Vec<_> = seen.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2; c=3"], "{seen:?}");

    // HTTP/1.1 to HTTP/1.1: as the client sent it.
    let req = Request::get("/one")
        .header("host", "c")
        .header("cookie", "a=1; b=2")
        .body(empty())
        .unwrap();
    let reply = H1::connect(proxy.addr()).await.request(req).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(backend.last().headers["cookie"], "a=1; b=2");
}

#[tokio::test]
async fn hop_by_hop_headers_stop_at_the_proxy() {
    let backend = Backend::start("h").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("h").at(backend.addr))
        .service(ServiceYaml::new("h2").http2().at(backend.addr))
        .start()
        .await;
    let mut client = H1::connect(proxy.addr()).await;
    for host in ["h", "h2"] {
        let req = Request::get("/")
            .header("host", host)
            .header("connection", "keep-alive, x-secret")
            .header("keep-alive", "timeout=5")
            .header("x-secret", "named in Connection")
            .header("proxy-connection", "keep-alive")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("x-end-to-end", "yes")
            .header("authorization", "Bearer t")
            .header("cookie", "a=1")
            .body(empty())
            .unwrap();
        assert_eq!(client.request(req).await.status, StatusCode::OK);
        let seen = backend.last();
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "proxy-connection",
            "proxy-authorization",
            "transfer-encoding",
        ] {
            assert!(
                seen.headers.get(gone).is_none(),
                "{gone} reached the {host} backend: {:?}",
                seen.headers
            );
        }
        assert_eq!(seen.headers["x-end-to-end"], "yes");
        assert_eq!(seen.headers["authorization"], "Bearer t");
        assert_eq!(seen.headers["cookie"], "a=1");
    }
}

#[tokio::test]
async fn grpc_trailers_reach_the_h2_client_and_te_reaches_the_backend() {
    let backend = Backend::builder("grpc")
        .trailer("grpc-status", "0")
        .trailer("grpc-message", "ok")
        .start()
        .await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("greeter").http2().at(backend.addr))
        .start()
        .await;
    let mut client = H2::connect(proxy.addr()).await;
    // A unary gRPC call: 5-byte frame header plus an empty message.
    let req = Request::post("http://greeter/helloworld.Greeter/SayHello")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(vec![0u8, 0, 0, 0, 0]))
        .unwrap();
    let reply = client.request(req).await;
    assert_eq!(reply.status, StatusCode::OK);
    let trailers = reply.trailers.as_ref().expect("trailers arrived");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");

    let seen = backend.last();
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(seen.headers["te"], "trailers");
    assert_eq!(seen.headers["content-type"], "application/grpc");
    assert_eq!(seen.body_len, 5);
    assert_eq!(seen.path, "/helloworld.Greeter/SayHello");
}

#[tokio::test]
async fn trailers_also_reach_an_h1_client_that_asks_for_them() {
    // HTTP/1.1 carries trailers in a chunked body when the client sends
    // `TE: trailers`.
    let backend = Backend::builder("t")
        .trailer("grpc-status", "0")
        .start()
        .await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("t").http2().at(backend.addr))
        .start()
        .await;
    let req = Request::post("/x")
        .header("host", "t")
        .header("te", "trailers")
        .body(full("hi"))
        .unwrap();
    let reply = H1::connect(proxy.addr()).await.request(req).await;
    assert_eq!(reply.status, StatusCode::OK);
    let trailers = reply.trailers.as_ref().expect("trailers arrived");
    assert_eq!(trailers["grpc-status"], "0");
}

/// An HTTP/1.0 service's answer reaches an HTTP/1.1 client as the
/// proxy's own HTTP/1.1 (RFC 9110 §2.5): framed, even when the service
/// gave no length and closed, and the client's connection stays open.
#[tokio::test]
async fn an_http10_service_is_answered_as_http11() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from 1.0")
                    .await;
            });
        }
    });
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("old").at(addr))
        .start()
        .await;
    let mut client = H1::connect(proxy.addr()).await;
    for _ in 0..2 {
        let reply = client.get("old", "/").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.version, http::Version::HTTP_11);
        assert_eq!(reply.text(), "hello from 1.0");
    }
}

/// A WebSocket backend that echoes each message (text with its name).
#[allow(clippy::unwrap_used)]
async fn websocket_echo() -> std::net::SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    let reply = match msg {
                        Message::Text(t) => Message::text(format!("chat says: {t}")),
                        Message::Binary(b) => Message::binary(b),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    ws_addr
}

/// An upgraded connection keeps its `max_connections` place while its
/// tunnel is open (hyper hands the socket over and is done with it): with
/// one place, a second client is refused until the WebSocket closes.
#[tokio::test]
async fn a_websocket_tunnel_keeps_its_connection_place() {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::Message;

    let ws_addr = websocket_echo().await;
    let proxy = ProxyYaml::new()
        .top("limits: { max_connections: 1 }")
        .by_host()
        .service(ServiceYaml::new("chat").at(ws_addr))
        .start()
        .await;
    let stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut ws, _) = within(
        "websocket handshake",
        tokio_tungstenite::client_async("ws://chat/socket", stream),
    )
    .await
    .expect("handshake through the proxy");
    ws.send(Message::text("hi")).await.unwrap();
    let got = within("websocket echo", ws.next()).await;
    assert_eq!(
        got.and_then(Result::ok),
        Some(Message::text("chat says: hi"))
    );
    // The tunnel holds the one place: another client is closed unanswered.
    let mut second = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let _ = second
        .write_all(b"GET / HTTP/1.1\r\nHost: chat\r\n\r\n")
        .await;
    let answer = raw_after_write(&mut second).await;
    assert!(answer.is_empty(), "answered: {answer:?}");
    // The tunnel closes: the place is free again.
    ws.close(None).await.unwrap();
    drop(ws);
    eventually("a place is free again", || async {
        let answer = raw(
            proxy.addr(),
            b"GET / HTTP/1.1\r\nHost: chat\r\nConnection: close\r\n\r\n",
        );
        !answer.await.is_empty()
    })
    .await;
}

/// What a connection gets until it closes (at most 5 s), lossily as text.
#[allow(clippy::unwrap_used)]
async fn raw_after_write(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut got),
    )
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

/// An upgrade whose first try meets a refused connection is retried on
/// the other endpoint and still becomes a tunnel (not a 101 that closes).
#[tokio::test]
async fn websocket_upgrade_retried_after_a_connect_failure_still_tunnels() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let ws_addr = websocket_echo().await;
    // Round robin over a dead and a live endpoint; connect failures do not
    // eject here, so every other handshake is tried on the dead one first.
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("chat")
                .lb("round_robin")
                .at(closed_port().await)
                .at(ws_addr)
                .set("circuit_breaker", "{ failure_on: [\"5xx\"] }")
                .set("retries", "{ attempts: 2, min_per_second: 100 }"),
        )
        .start()
        .await;
    for i in 0..6 {
        let stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut ws, resp) = within(
            "websocket handshake",
            tokio_tungstenite::client_async("ws://chat/socket", stream),
        )
        .await
        .expect("handshake through the proxy");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let got = within("websocket echo", ws.next()).await;
        assert_eq!(
            got.and_then(Result::ok),
            Some(Message::text(format!("chat says: hello {i}"))),
            "handshake {i}: the tunnel carries messages"
        );
    }
    let metrics = proxy.admin_get("/metrics").await.text();
    assert!(metric(&metrics, "almond_retries_total", &[("service", "chat")]) >= 1.0);
}

#[tokio::test]
async fn websocket_upgrade_tunnels_through() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let ws_addr = websocket_echo().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("chat").at(ws_addr))
        .start()
        .await;

    let stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut ws, resp) = within(
        "websocket handshake",
        tokio_tungstenite::client_async("ws://chat/socket", stream),
    )
    .await
    .expect("handshake through the proxy");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);

    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let got = within("websocket echo", ws.next()).await.unwrap().unwrap();
        assert_eq!(got, Message::text(format!("chat says: hello {i}")));
    }
    let blob: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    let got = within("websocket binary echo", ws.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.into_data().as_ref(), &blob[..]);
    ws.close(None).await.unwrap();

    // The proxy keeps serving ordinary requests beside the tunnel.
    let reply = get_h1(proxy.addr(), "nosuch", "/").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

/// An upgrade always goes up over HTTP/1.1, so it goes in HTTP/1.1's
/// form, whatever the service's protocol: an origin-form target and a
/// `Host` (it went absolute-form with no `Host` to a `protocol: http2`
/// service, which Go's net/http and nginx answer 400).
#[tokio::test]
#[allow(clippy::unwrap_used)]
async fn an_upgrade_to_an_http2_service_goes_up_in_http1_form() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let head = read_head(&mut conn).await;
        let _ = seen_tx.send(head);
        let answer =
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n";
        let _ = conn.write_all(answer).await;
        let (mut from, mut to) = conn.split();
        let _ = tokio::io::copy(&mut from, &mut to).await;
    });
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("echo").http2().at(addr))
        .start()
        .await;
    let _conn = upgraded(proxy.addr()).await;
    let head = within("the upstream's head", seen_rx).await.unwrap();
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("GET /tunnel HTTP/1.1"), "{head}");
    assert!(
        lines.any(|l| l.eq_ignore_ascii_case("host: echo")),
        "{head}"
    );
}

/// A proxy (with `top` in its config) in front of an [`upgrade_echo`];
/// the count of the upstream side's closes.
async fn echo_proxy(top: &str) -> (TestProxy, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let (echo, closed) = upgrade_echo().await;
    let proxy = ProxyYaml::new()
        .top(top)
        .by_host()
        .service(ServiceYaml::new("echo").at(echo))
        .start()
        .await;
    (proxy, closed)
}

/// A backend that answers every request `101` (`upgrade: echo`) and then
/// echoes bytes until the proxy closes its side; the number of tunnels it
/// saw closed.
#[allow(clippy::unwrap_used)]
async fn upgrade_echo() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                if read_head(&mut conn).await.is_empty() {
                    return;
                }
                let head = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n";
                if conn.write_all(head).await.is_err() {
                    return;
                }
                let (mut from, mut to) = conn.split();
                let _ = tokio::io::copy(&mut from, &mut to).await;
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    (addr, closed)
}

/// A head read byte by byte (nothing after it taken), as text; empty if
/// the connection ends first.
async fn read_head(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read_u8().await {
            Ok(b) => head.push(b),
            Err(_) => return String::new(),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A client connection upgraded through `proxy` to service `echo`.
#[allow(clippy::unwrap_used)]
async fn upgraded(proxy: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let req = b"GET /tunnel HTTP/1.1\r\nhost: echo\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n";
    conn.write_all(req).await.unwrap();
    let head = within("the 101", read_head(&mut conn)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "answered: {head:?}");
    conn
}

/// `bytes` sent through the tunnel and echoed back.
#[allow(clippy::unwrap_used)]
async fn echoed(conn: &mut tokio::net::TcpStream, bytes: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(bytes).await.unwrap();
    let mut back = vec![0; bytes.len()];
    within("the echo", conn.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(back, bytes);
}

/// How long until the proxy closes `conn` (nothing more arriving first);
/// fails after 5 s.
#[allow(clippy::expect_used)]
async fn closed_after(conn: &mut tokio::net::TcpStream) -> std::time::Duration {
    use tokio::io::AsyncReadExt;
    let start = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        conn.read_to_end(&mut rest),
    );
    // A reset is a close too.
    let _ = read.await.expect("the proxy closed the tunnel within 5 s");
    assert!(rest.is_empty(), "more arrived: {rest:?}");
    start.elapsed()
}

/// An open tunnel is a request in flight until it closes, as Envoy counts
/// an upgraded stream active: in `almond_requests_in_flight` and under
/// `circuit_breaker.max_requests`. A service's WebSockets cannot pile up
/// past its limit unseen (its 101 used to end the request's count).
#[tokio::test]
async fn an_open_tunnel_counts_in_flight_until_it_closes() {
    let (echo, _) = upgrade_echo().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("echo").at(echo).max_requests(1))
        .start()
        .await;
    let in_flight = || async {
        let text = proxy.admin_get("/metrics").await.text();
        metric(&text, "almond_requests_in_flight", &[("service", "echo")])
    };
    let mut conn = upgraded(proxy.addr()).await;
    echoed(&mut conn, b"ping").await;
    assert_eq!(in_flight().await, 1.0);
    // The service's one place is the tunnel's: another upgrade is shed.
    let mut other = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let req = b"GET /tunnel HTTP/1.1\r\nhost: echo\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut other, req)
        .await
        .unwrap();
    let second = within("the shed answer", read_head(&mut other)).await;
    assert!(second.starts_with("HTTP/1.1 503"), "answered: {second:?}");
    assert!(
        second
            .to_ascii_lowercase()
            .contains("x-almond-overloaded: true"),
        "answered: {second:?}"
    );
    // Still open meanwhile.
    echoed(&mut conn, b"still here").await;
    drop(conn);
    eventually("the tunnel's place given back", || async {
        in_flight().await == 0.0
    })
    .await;
    let mut again = upgraded(proxy.addr()).await;
    echoed(&mut again, b"ping").await;
}

/// A tunnel on which no byte moves either way for `limits.idle_timeout`
/// is closed, both sides (as Nginx's `proxy_read_timeout` closes a
/// WebSocket).
#[tokio::test]
async fn an_idle_tunnel_is_closed_after_the_idle_timeout() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let (proxy, closed) = echo_proxy("limits: { idle_timeout: 300ms }").await;
    let mut conn = upgraded(proxy.addr()).await;
    echoed(&mut conn, b"ping").await;
    let quiet = closed_after(&mut conn).await;
    assert!(
        quiet >= Duration::from_millis(250),
        "closed {quiet:?} after the last byte"
    );
    eventually("the upstream side closed too", || async {
        closed.load(Ordering::SeqCst) == 1
    })
    .await;
}

/// A tunnel that moves bytes more often than `limits.idle_timeout` stays
/// open past it, however long it lives.
#[tokio::test]
async fn a_busy_tunnel_outlives_the_idle_timeout() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let (proxy, closed) = echo_proxy("limits: { idle_timeout: 500ms }").await;
    let mut conn = upgraded(proxy.addr()).await;
    let start = tokio::time::Instant::now();
    // A byte each way every 100 ms, for three times the idle limit.
    while start.elapsed() < Duration::from_millis(1500) {
        echoed(&mut conn, b"tick").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    echoed(&mut conn, b"still open").await;
    assert_eq!(closed.load(Ordering::SeqCst), 0);
    // Quiet from now on: closed.
    closed_after(&mut conn).await;
}

/// A tunnel still open when the drain's time is up is closed, both
/// sides, and the proxy stops: the drain waited for it until then.
#[tokio::test]
async fn a_tunnel_is_closed_when_the_drain_ends() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let (proxy, closed) = echo_proxy("drain_timeout: 300ms").await;
    let mut conn = upgraded(proxy.addr()).await;
    echoed(&mut conn, b"ping").await;
    let start = tokio::time::Instant::now();
    proxy.shutdown().await;
    let stopped = start.elapsed();
    assert!(
        stopped >= Duration::from_millis(250),
        "stopped after {stopped:?}, without waiting for the tunnel"
    );
    closed_after(&mut conn).await;
    eventually("the upstream side closed too", || async {
        closed.load(Ordering::SeqCst) == 1
    })
    .await;
}

/// A tunnel that ends by itself during the drain lets the proxy stop then,
/// not at the drain's end.
#[tokio::test]
async fn a_tunnel_that_ends_in_the_drain_lets_the_proxy_stop() {
    use std::time::Duration;
    let (proxy, _) = echo_proxy("drain_timeout: 20s").await;
    let mut conn = upgraded(proxy.addr()).await;
    echoed(&mut conn, b"ping").await;
    let start = tokio::time::Instant::now();
    let stopping = tokio::spawn(proxy.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!stopping.is_finished(), "stopped with a tunnel open");
    drop(conn);
    within("the proxy stopping", stopping).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn request_bodies_and_methods_pass_through() {
    let backend = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("b").at(backend.addr))
        .service(ServiceYaml::new("b2").http2().at(backend.addr))
        .start()
        .await;
    let mut h1 = H1::connect(proxy.addr()).await;
    let mut h2 = H2::connect(proxy.addr()).await;
    let mut by_backend: HashMap<&str, u64> = HashMap::new();
    for (host, method) in [("b", "PUT"), ("b2", "POST"), ("b", "DELETE")] {
        let body = vec![b'z'; 12_345];
        let req = Request::builder()
            .method(method)
            .uri("/upload?id=7")
            .header("host", host)
            .body(full(body.clone()))
            .unwrap();
        let reply = h1.request(req).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["method"], method);
        assert_eq!(reply.json()["body_len"], 12_345);
        *by_backend.entry(host).or_default() += 1;

        let req = Request::builder()
            .method(method)
            .uri(format!("http://{host}/upload?id=7"))
            .body(full(body))
            .unwrap();
        let reply = h2.request(req).await;
        assert_eq!(reply.json()["method"], method);
        assert_eq!(reply.json()["body_len"], 12_345);
    }
    assert_eq!(backend.count(), 6);
}

/// An upstream that answers on its idle connections before closing them
/// (an unsolicited `408`, as some servers send at their keep-alive
/// timeout): that answer belongs to no request, and the proxy's next
/// request goes on a new connection and gets its own answer.
#[tokio::test]
async fn an_unsolicited_answer_on_an_idle_upstream_connection_is_never_relayed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if conn.write_all(ok).await.is_err() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let late = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
                let _ = conn.write_all(late).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("web").at(addr))
        .start()
        .await;
    let mut client = H1::connect(proxy.addr()).await;
    for _ in 0..3 {
        let reply = client.get("web", "/").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, "ok");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
}

/// curl's `--http2` and Java's `HttpClient` offer a cleartext HTTP/2
/// upgrade (`Upgrade: h2c`) on `http://` URLs. The proxy declines it, as
/// Envoy does: the request goes on as a plain one, in the service's
/// protocol (here HTTP/2) on a pooled connection, without the upgrade's
/// fields. (It was tunnelled: forced to HTTP/1.1 on a new connection,
/// never pooled, retried or mirrored, with `Upgrade: h2c` sent on
/// without its `HTTP2-Settings`.)
#[tokio::test]
async fn an_h2c_upgrade_offer_is_declined_and_the_request_goes_on_plain() {
    let backend = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("grpcish").http2().at(backend.addr))
        .start()
        .await;
    let mut client = H1::connect(proxy.addr()).await;
    for _ in 0..2 {
        let req = Request::get("/offer")
            .header("host", "grpcish")
            .header("connection", "Upgrade, HTTP2-Settings")
            .header("upgrade", "h2c")
            .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
            .body(empty())
            .unwrap();
        let reply = client.request(req).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let seen = backend.last();
        assert_eq!(
            seen.version,
            http::Version::HTTP_2,
            "the service's protocol"
        );
        for name in ["upgrade", "http2-settings", "connection"] {
            assert!(
                !seen.headers.contains_key(name),
                "{name}: {:?}",
                seen.headers
            );
        }
    }
    assert_eq!(backend.count(), 2);
    assert_eq!(
        backend.connections(),
        1,
        "the upstream connection was pooled"
    );
}

/// A raw HTTP/1.1 upstream on 127.0.0.1: each request head on a keep-alive
/// connection is answered with `answer(head)`, written in one piece
/// (bodies are not read: the requests have none). Its address, and the
/// connections it accepted.
#[allow(clippy::unwrap_used)]
async fn raw_upstream(
    answer: fn(&str) -> Vec<u8>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let end = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&seen[..end]).into_owned();
                    seen.drain(..end);
                    if conn.write_all(&answer(&head)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// An upstream that sends bytes past its answer's framing (here a body on
/// its answer to `HEAD`, written with the head in one piece, the head
/// exactly filling the proxy's first read): those bytes are no answer to
/// the next request, which goes on a new connection and gets its own.
/// (The connection was pooled with them unread in the kernel, so the next
/// request on it got the smuggled answer.)
#[tokio::test]
async fn bytes_past_an_answer_s_end_are_never_taken_for_the_next_answer() {
    let (addr, accepted) = raw_upstream(|head| {
        if !head.starts_with("HEAD ") {
            return b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ngood".to_vec();
        }
        /// The lean client's first read of a new connection.
        const FIRST_READ: usize = 8192;
        let smuggled = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil";
        let start = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-pad: ",
            smuggled.len()
        );
        let pad = FIRST_READ - start.len() - 4;
        let mut answer = start.into_bytes();
        answer.extend(std::iter::repeat_n(b'a', pad));
        answer.extend_from_slice(b"\r\n\r\n");
        assert_eq!(answer.len(), FIRST_READ);
        answer.extend_from_slice(smuggled);
        answer
    })
    .await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("web").at(addr))
        .start()
        .await;
    let mut client = H1::connect(proxy.addr()).await;
    let head = Request::head("/")
        .header("host", "web")
        .body(empty())
        .unwrap();
    let reply = client.request(head).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body.is_empty());
    let reply = client.get("web", "/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "good");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// An upstream's response head reaches the client whole, less only what
/// a proxy must drop: a Node.js server's `Connection: keep-alive` and
/// `Keep-Alive` lines and the request ID it echoes (the proxy's own goes
/// out instead), every other line as the upstream wrote it, repeated
/// `Set-Cookie` lines included; a `Connection` line naming another
/// header takes that header with it. (The lean client passes a simple
/// head's lines through without reading them into a map: both ways
/// here.)
#[tokio::test]
async fn an_upstream_head_reaches_the_client_less_its_hop_by_hop_lines() {
    let (addr, _) = raw_upstream(|head| {
        let answer: &[u8] = if head.starts_with("GET /hop ") {
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n\
              X-Kept: yes\r\nContent-Length: 3\r\n\r\nhop"
        } else {
            b"HTTP/1.1 201 Created\r\nX-Powered-By: Express\r\nX-Request-Id: upstream-id\r\n\
              Set-Cookie: a=1; Path=/\r\nset-cookie: b=2\r\nETag: W/\"2-x\"\r\n\
              Content-Type: application/json; charset=utf-8\r\nContent-Length: 2\r\n\
              Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n{}"
        };
        answer.to_vec()
    })
    .await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("web").at(addr))
        .start()
        .await;
    let text = raw(
        proxy.addr(),
        b"GET /node HTTP/1.1\r\nhost: web\r\nx-request-id: client-id\r\n\r\n\
          GET /hop HTTP/1.1\r\nhost: web\r\nx-request-id: second-id\r\nconnection: close\r\n\r\n",
    )
    .await;
    // The two responses, at the second status line.
    let second = text
        .get(1..)
        .and_then(|t| t.find("HTTP/1.1 "))
        .map_or(text.len(), |i| i + 1);
    let (node, hop) = text.split_at(second);
    let lines =
        |head: &str| -> Vec<String> { head.split("\r\n").map(str::to_ascii_lowercase).collect() };
    let node = lines(node);
    assert_eq!(node[0], "http/1.1 201 created", "{text}");
    for want in [
        "x-powered-by: express",
        "set-cookie: a=1; path=/",
        "set-cookie: b=2",
        "etag: w/\"2-x\"",
        "content-type: application/json; charset=utf-8",
        "content-length: 2",
        "x-request-id: client-id",
    ] {
        assert_eq!(
            node.iter().filter(|l| *l == want).count(),
            1,
            "{want}: {text}"
        );
    }
    assert!(node.iter().any(|l| l.starts_with("date: ")), "{text}");
    for gone in [
        "x-request-id: upstream-id",
        "connection: keep-alive",
        "keep-alive: timeout=5",
    ] {
        assert!(!node.iter().any(|l| l == gone), "{gone}: {text}");
    }
    assert!(node.last().is_some_and(|l| l == "{}"), "{text}");
    let hop = lines(hop);
    assert_eq!(hop[0], "http/1.1 200 ok", "{text}");
    assert!(hop.iter().any(|l| l == "x-kept: yes"), "{text}");
    assert!(hop.iter().any(|l| l == "x-request-id: second-id"), "{text}");
    assert!(!hop.iter().any(|l| l.starts_with("x-hop")), "{text}");
    assert!(text.ends_with("\r\n\r\nhop"), "{text}");
}

/// An HTTP/2 client gets one `x-request-id`, the request's, whatever the
/// upstream's answer carried: its own kept, or one made here.
#[tokio::test]
async fn an_http2_client_gets_one_request_id_in_place_of_the_upstream_s() {
    let (addr, _) = raw_upstream(|head| {
        let answer: &[u8] = match head.split(' ').next() {
            Some("HEAD") => {
                b"HTTP/1.1 200 OK\r\nX-Request-Id: upstream-id\r\nContent-Length: 2\r\n\r\n"
            }
            Some("DELETE") => b"HTTP/1.1 204 No Content\r\nX-Request-Id: upstream-id\r\n\r\n",
            _ => b"HTTP/1.1 200 OK\r\nX-Request-Id: upstream-id\r\nContent-Length: 2\r\n\r\nok",
        };
        answer.to_vec()
    })
    .await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("web").at(addr))
        .start()
        .await;
    let mut c = H2::connect(proxy.addr()).await;
    let ids = |reply: &Reply| -> Vec<String> {
        (reply.headers.get_all("x-request-id").iter())
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    let mut req = h2_get("web", "/");
    req.headers_mut()
        .insert("x-request-id", "client-id".parse().unwrap());
    let kept = c.request(req).await;
    assert_eq!(kept.status, StatusCode::OK);
    assert_eq!(kept.body, "ok");
    assert_eq!(ids(&kept), ["client-id"]);
    let made = c.get("web", "/").await;
    let made = ids(&made);
    assert_eq!(made.len(), 1, "{made:?}");
    assert!(made[0].len() == 32 && made[0] != "upstream-id", "{made:?}");
    // Answers that end with their head: a HEAD's, a 204.
    for method in [http::Method::HEAD, http::Method::DELETE] {
        let mut req = h2_get("web", "/");
        *req.method_mut() = method.clone();
        req.headers_mut()
            .insert("x-request-id", "bodiless-id".parse().unwrap());
        let reply = c.request(req).await;
        assert!(
            reply.status.is_success() && reply.body.is_empty(),
            "{method}"
        );
        assert_eq!(ids(&reply), ["bodiless-id"], "{method}");
    }
    // A proxy's own answer (no such service) carries it too.
    let own = c.get("nosuch", "/").await;
    assert!(own.status.is_client_error() || own.status.is_server_error());
    assert_eq!(ids(&own).len(), 1);
}

/// Upstream HTTP/1.1 connections are pooled and reused: one client's
/// sequential requests need one connection, eight concurrent clients no
/// more than eight; a backend that closes its idle connections (its
/// keep-alive timeout) costs no request.
#[tokio::test]
async fn upstream_h1_connections_are_pooled_and_reused() {
    let backend = Backend::start("one").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("web").at(backend.addr))
        .start()
        .await;
    let mut client = H1::connect(proxy.addr()).await;
    for i in 0..20 {
        let path = format!("/bytes/{}", 1 + i * 7000);
        let reply = client.get("web", &path).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body.len(), 1 + i * 7000);
    }
    assert_eq!(backend.connections(), 1, "20 sequential requests");

    // The backend closes its idle connections; the next requests go on a
    // new one, every one answered.
    backend.close_connections().await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    for _ in 0..5 {
        assert_eq!(client.get("web", "/").await.status, StatusCode::OK);
    }
    assert_eq!(backend.connections(), 2, "after the backend closed them");

    let mut clients = Vec::new();
    for _ in 0..8 {
        let addr = proxy.addr();
        clients.push(tokio::spawn(async move {
            let mut client = H1::connect(addr).await;
            for _ in 0..25 {
                assert_eq!(client.get("web", "/").await.status, StatusCode::OK);
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(backend.count(), 20 + 5 + 200);
    let opened = backend.connections();
    assert!(
        opened <= 2 + 8,
        "{opened} connections for 8 concurrent clients"
    );
}

/// One keep-alive connection carrying simple requests and a small body
/// (the lean server's) and then a chunked one (handed to hyper
/// mid-connection, with what was already read): every request answered,
/// in order, bodies intact.
#[tokio::test]
async fn a_connection_handed_from_the_lean_server_to_hyper_loses_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("one").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("web").at(backend.addr))
        .start()
        .await;
    let mut conn = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    // Pipelined in one write: the chunked POST's head and body arrive
    // with the others, in the lean server's buffer.
    let requests = "GET /a HTTP/1.1\r\nhost: web\r\n\r\n\
                    HEAD /b HTTP/1.1\r\nhost: web\r\n\r\n\
                    POST /p HTTP/1.1\r\nhost: web\r\ncontent-length: 3\r\n\r\nabc\
                    POST /c HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
                    GET /d HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n";
    conn.write_all(requests.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut got),
    )
    .await
    .expect("the proxy closes after the last request")
    .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 5, "{text}");
    let (a, p, c, d) = (
        text.find(r#""path":"/a""#),
        text.find(r#""path":"/p""#),
        text.find(r#""path":"/c""#),
        text.find(r#""path":"/d""#),
    );
    assert!(
        a < p && p < c && c < d && a.is_some(),
        "answers in order: {text}"
    );
    assert!(text.contains(r#""body_len":3"#), "{text}");
    assert!(text.contains(r#""body_len":5"#), "{text}");
    assert_eq!(backend.count(), 5);
}

/// An upstream answer framed by `Transfer-Encoding: chunked` that also
/// names a `Content-Length` (10, of its 30 bytes) reaches the client whole,
/// over HTTP/1.1 and HTTP/2: the coding wins, the length is dropped (RFC
/// 9112 §6.3), and nothing is cut at 10 bytes.
#[tokio::test]
async fn a_length_beside_a_transfer_coding_is_dropped_not_obeyed() {
    let body = "thirty bytes of chunked body!!";
    let answer = format!(
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 10\r\nconnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    // Once a connection (`holding` answers once on each).
    let (addr, _closed) = holding(answer.into_bytes()).await;
    let (proxy, _backend, send) = h2_client(addr).await;
    let reply = get_h1(proxy.addr(), "web", "/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, body.as_bytes());
    assert!(
        !reply.headers.contains_key("content-length"),
        "{:?}",
        reply.headers
    );

    let mut send = send.ready().await.unwrap();
    let (answer, _) = send
        .send_request(Request::get("http://web/").body(()).unwrap(), true)
        .unwrap();
    let resp = within("the h2 answer", answer).await.unwrap();
    assert!(!resp.headers().contains_key("content-length"));
    let mut got = Vec::new();
    let mut recv = resp.into_body();
    while let Some(data) = within("the h2 body", recv.data()).await {
        got.extend_from_slice(&data.unwrap());
    }
    assert_eq!(got, body.as_bytes());
}

/// A response body in a transfer coding other than `chunked` alone
/// (`gzip, chunked`, `gzip`, two lines) is refused with a 502, as nginx's
/// "upstream sent unknown Transfer-Encoding": the proxy would undo the
/// chunking and drop the header, handing the client gzip bytes labelled
/// as none. Through the lean client (a GET) and hyper's (a streamed POST),
/// to HTTP/1.1 and HTTP/2 clients.
#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_refused() {
    for coding in [
        "transfer-encoding: gzip, chunked",
        "transfer-encoding: gzip",
        "transfer-encoding: chunked\r\ntransfer-encoding: chunked",
    ] {
        let answer = format!("HTTP/1.1 200 OK\r\n{coding}\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
        let (addr, _closed) = holding(answer.into_bytes()).await;
        let (proxy, _backend, send) = h2_client(addr).await;
        let reply = get_h1(proxy.addr(), "web", "/").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{coding}");
        assert_ne!(reply.body, &b"hello"[..]);

        let mut h1 = H1::connect(proxy.addr()).await;
        let post = Request::post("/upload")
            .header("host", "web")
            .body(stream_of(100))
            .unwrap();
        let reply = h1.request(post).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{coding} (streamed)");

        let mut send = send.ready().await.unwrap();
        let (answer, _) = send
            .send_request(Request::get("http://web/").body(()).unwrap(), true)
            .unwrap();
        let resp = within("the h2 answer", answer).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{coding} (h2)");
    }
    // `chunked` alone, in any case, is relayed.
    let answer = "HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let (addr, _closed) = holding(answer.as_bytes().to_vec()).await;
    let (proxy, _backend, _send) = h2_client(addr).await;
    let reply = get_h1(proxy.addr(), "web", "/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, &b"hello"[..]);
}

/// A 101 answering a request that asked for no upgrade is a 502, as
/// nginx answers: relayed, it broke HTTP/1.1 connections (the lean
/// server wrote a 500 and closed, counted as a 1xx success) and HTTP/2
/// streams (HTTP/2 has no 101). Through the lean client (a GET) and
/// hyper's (a streamed POST), to HTTP/1.1 and HTTP/2 clients; the next
/// request on the client's connection is served.
#[tokio::test]
async fn a_101_to_a_request_without_upgrade_is_502() {
    let answer = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n";
    let (addr, _closed) = holding(answer.to_vec()).await;
    let (proxy, _backend, send) = h2_client(addr).await;
    let mut h1 = H1::connect(proxy.addr()).await;
    let reply = h1.get("web", "/").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.header("x-almond-error"), Some("reset"));
    let post = Request::post("/upload")
        .header("host", "web")
        .body(stream_of(100))
        .unwrap();
    let reply = h1.request(post).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "streamed");
    assert_eq!(h1.get("other", "/").await.status, StatusCode::OK);

    let mut send = send.ready().await.unwrap();
    let (answer, _) = send
        .send_request(Request::get("http://web/").body(()).unwrap(), true)
        .unwrap();
    let resp = within("the h2 answer", answer).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    still_serves(send).await;
}

/// An HTTP/1.1 upstream's trailer section naming a field HTTP/2 forbids
/// (`keep-alive`) reaches an HTTP/2 client without it, its other
/// trailers intact and the stream ended cleanly (`h2` refused the whole
/// section, and the stream was reset after its body).
#[tokio::test]
async fn an_h1_trailer_http2_forbids_is_left_out_for_h2_clients() {
    let answer = b"HTTP/1.1 200 OK\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nkeep-alive: timeout=5\r\nx-checksum: 42\r\n\r\n";
    let (addr, _closed) = holding(answer.to_vec()).await;
    let (_proxy, _backend, send) = h2_client(addr).await;
    let mut send = send.ready().await.unwrap();
    let req = Request::get("http://web/")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (answer, _) = send.send_request(req, true).unwrap();
    let resp = within("the h2 answer", answer).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut recv = resp.into_body();
    let mut got = Vec::new();
    while let Some(data) = within("the h2 body", recv.data()).await {
        got.extend_from_slice(&data.expect("the body, not a reset"));
    }
    assert_eq!(got, b"hello");
    let trailers = within("the trailers", recv.trailers())
        .await
        .expect("trailers, not a reset")
        .expect("trailers");
    assert_eq!(trailers["x-checksum"], "42");
    assert!(!trailers.contains_key("keep-alive"), "{trailers:?}");
}

/// A `Content-Length` sent as a list or on two lines with one value
/// (`2, 2`) is relayed as that one value, which HTTP/2 clients (h2,
/// nghttp2) accept and refuse as sent (a reset stream); a 204's length,
/// which a 204 must not have, is not relayed.
#[tokio::test]
async fn repeated_lengths_are_relayed_as_one() {
    for answer in [
        "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2, 2\r\n\r\nok",
        "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok",
    ] {
        let (addr, _closed) = holding(answer.as_bytes().to_vec()).await;
        let (proxy, _backend, send) = h2_client(addr).await;
        let reply = get_h1(proxy.addr(), "web", "/").await;
        assert_eq!(reply.status, StatusCode::OK, "{answer:?}");
        let lengths: Vec<_> = reply.headers.get_all("content-length").iter().collect();
        assert_eq!(lengths, ["2"], "{answer:?}");
        assert_eq!(reply.body, &b"ok"[..]);

        let mut send = send.ready().await.unwrap();
        let (answer, _) = send
            .send_request(Request::get("http://web/").body(()).unwrap(), true)
            .unwrap();
        let resp = within("the h2 answer", answer).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-length"], "2");
        let mut recv = resp.into_body();
        let data = within("the h2 body", recv.data()).await.unwrap().unwrap();
        assert_eq!(&data[..], b"ok");
    }
    let (addr, _closed) = holding(
        b"HTTP/1.1 204 No Content\r\nconnection: close\r\ncontent-length: 5\r\n\r\n".to_vec(),
    )
    .await;
    let (_proxy, _backend, send) = h2_client(addr).await;
    let mut send = send.ready().await.unwrap();
    let (answer, _) = send
        .send_request(Request::get("http://web/").body(()).unwrap(), true)
        .unwrap();
    let resp = within("the h2 answer", answer).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(!resp.headers().contains_key("content-length"));
    let mut recv = resp.into_body();
    assert!(within("the h2 end", recv.data()).await.is_none());
}

/// An upstream that reads a request's head and never answers; it says,
/// for each connection the proxy closes, whether a whole head came first.
async fn never_answering() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<bool>,
) {
    holding(Vec::new()).await
}

/// An upstream that reads a request's head, writes `answer` once the head
/// is whole (nothing, for one that never answers) and then holds the
/// connection; it says, for each connection the proxy closes, whether a
/// whole head came first.
#[allow(clippy::unwrap_used)]
async fn holding(
    answer: Vec<u8>,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (closed_tx, answer) = (closed_tx.clone(), answer.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                let mut whole = false;
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    if !whole && seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        whole = true;
                        let _ = conn.write_all(&answer).await;
                    }
                }
                let _ = closed_tx.send(whole);
            });
        }
    });
    (addr, closed_rx)
}

/// An upstream that answers a 200 with the first 1,000 bytes of a
/// 1,000,000-byte body and then stalls (see [`holding`]).
async fn stalling_mid_body() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<bool>,
) {
    let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n".to_vec();
    answer.extend_from_slice(&[b'x'; 1000]);
    holding(answer).await
}

/// A client that closes its connection while its request is at the
/// upstream cancels it: the proxy closes the upstream exchange at once
/// (as hyper's server did for every HTTP/1.1 request), not when the
/// upstream answers or the request times out.
#[tokio::test]
async fn a_client_that_goes_away_cancels_its_upstream_request() {
    use tokio::io::AsyncWriteExt;
    let (addr, mut closed_rx) = never_answering().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("web").at(addr))
        .start()
        .await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    client
        .write_all(b"GET /slow HTTP/1.1\r\nhost: web\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(client);
    let closed = tokio::time::timeout(std::time::Duration::from_secs(3), closed_rx.recv())
        .await
        .expect("the upstream exchange is closed soon after the client goes away");
    assert_eq!(closed, Some(true), "the upstream had the request");
}

/// A proxy that routes `web` to `addr` and `other` to a backend of its
/// own, and an HTTP/2 connection to it.
#[allow(clippy::unwrap_used)]
async fn h2_client(
    addr: std::net::SocketAddr,
) -> (TestProxy, Backend, h2::client::SendRequest<bytes::Bytes>) {
    let backend = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("web").at(addr))
        .service(ServiceYaml::new("other").at(backend.addr))
        .start()
        .await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    (proxy, backend, send)
}

/// The HTTP/2 connection still serves: a request to `other` gets its 200.
#[allow(clippy::unwrap_used)]
async fn still_serves(send: h2::client::SendRequest<bytes::Bytes>) {
    let mut send = send.ready().await.unwrap();
    let next = Request::get("http://other/next").body(()).unwrap();
    let (answer, _) = send.send_request(next, true).unwrap();
    let resp = tokio::time::timeout(std::time::Duration::from_secs(3), answer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// An HTTP/2 client that resets its stream while the answer's body is on
/// its way cancels the upstream exchange (the body stops being read and
/// its connection is closed), and the connection goes on serving.
#[tokio::test]
async fn an_h2_client_that_resets_its_stream_mid_body_cancels_the_upstream_exchange() {
    let (addr, mut closed_rx) = stalling_mid_body().await;
    let (_proxy, _backend, mut send) = h2_client(addr).await;
    let big = Request::get("http://web/big").body(()).unwrap();
    let (answer, mut stream) = send.send_request(big, true).unwrap();
    let resp = tokio::time::timeout(std::time::Duration::from_secs(3), answer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(std::time::Duration::from_secs(3), body.data())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!first.is_empty() && first.iter().all(|&b| b == b'x'));
    stream.send_reset(h2::Reason::CANCEL);
    let closed = tokio::time::timeout(std::time::Duration::from_secs(3), closed_rx.recv())
        .await
        .expect("the upstream exchange is closed soon after the client resets its stream");
    assert_eq!(closed, Some(true), "the upstream had answered");
    still_serves(send).await;
}

/// An HTTP/2 client that resets its stream (its connection staying open)
/// cancels that request at the upstream, as one that goes away does; the
/// connection goes on serving.
#[tokio::test]
async fn an_h2_client_that_resets_its_stream_cancels_its_upstream_request() {
    let (addr, mut closed_rx) = never_answering().await;
    let (_proxy, _backend, mut send) = h2_client(addr).await;
    let slow = Request::get("http://web/slow").body(()).unwrap();
    let (answer, mut stream) = send.send_request(slow, true).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stream.send_reset(h2::Reason::CANCEL);
    let closed = tokio::time::timeout(std::time::Duration::from_secs(3), closed_rx.recv())
        .await
        .expect("the upstream exchange is closed soon after the client resets its stream");
    assert_eq!(closed, Some(true), "the upstream had the request");
    assert!(answer.await.is_err(), "no answer on a reset stream");
    still_serves(send).await;
}

/// `n` GETs to service `api` through the proxy at `addr`, each on a
/// connection of its own, all at once: their statuses.
async fn at_once(addr: std::net::SocketAddr, n: usize) -> Vec<StatusCode> {
    futures_util::future::join_all((0..n).map(|i| async move {
        H1::connect(addr)
            .await
            .get("api", &format!("/r{i}"))
            .await
            .status
    }))
    .await
}
