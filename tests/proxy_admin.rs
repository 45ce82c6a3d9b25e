//! End to end: the admin listener after real traffic -- golden metrics
//! count exactly what clients saw, and `/ready`, `/live`, `/config`,
//! `/endpoints` answer.

mod support;

use http::StatusCode;
use support::*;

#[tokio::test]
async fn metrics_count_exactly_what_clients_saw() {
    let backend = Backend::start("m").await;
    let dead = closed_port().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("m").endpoint(backend.addr, "v1", 1))
        .service(
            ServiceYaml::new("dead")
                .endpoint(dead, "v1", 1)
                .set("retries", "{ attempts: 0 }"),
        )
        .start()
        .await;

    const OK: usize = 7;
    const SERVER_ERRORS: usize = 2;
    const REFUSED: usize = 3;
    let mut client = H1::connect(proxy.addr()).await;
    for _ in 0..OK {
        assert_eq!(client.get("m", "/").await.status, StatusCode::OK);
    }
    for _ in 0..SERVER_ERRORS {
        let reply = client.get("m", "/status/500").await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    for _ in 0..REFUSED {
        assert_eq!(
            client.get("dead", "/").await.status,
            StatusCode::BAD_GATEWAY
        );
    }
    let unknown = client.get("nosuch", "/").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    let metrics = proxy.admin_get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{:?}",
        metrics.headers
    );
    let text = metrics.text();
    let m = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);

    let m_v1 = [
        ("direction", "outbound"),
        ("service", "m"),
        ("subset", "v1"),
    ];
    let ok_labels = [
        m_v1[0],
        m_v1[1],
        m_v1[2],
        ("code_class", "2xx"),
        ("outcome", "success"),
    ];
    assert_eq!(
        m("almond_requests_total", &ok_labels),
        OK as f64,
        "\n{text}"
    );
    let five = [
        m_v1[0],
        m_v1[1],
        m_v1[2],
        ("code_class", "5xx"),
        ("outcome", "failure"),
    ];
    assert_eq!(m("almond_requests_total", &five), SERVER_ERRORS as f64);
    assert_eq!(
        m("almond_request_duration_seconds_count", &m_v1),
        (OK + SERVER_ERRORS) as f64
    );
    // Buckets are cumulative: the +Inf bucket holds every request.
    let inf = [m_v1[0], m_v1[1], m_v1[2], ("le", "+Inf")];
    assert_eq!(
        m("almond_request_duration_seconds_bucket", &inf),
        (OK + SERVER_ERRORS) as f64
    );

    let dead_labels = [("service", "dead"), ("subset", "v1"), ("kind", "connect")];
    assert_eq!(
        m("almond_upstream_errors_total", &dead_labels),
        REFUSED as f64
    );
    let dead_requests = [
        ("direction", "outbound"),
        ("service", "dead"),
        ("code_class", "error"),
        ("outcome", "failure"),
    ];
    assert_eq!(m("almond_requests_total", &dead_requests), REFUSED as f64);
    // The endpoint that answered had no upstream errors.
    assert_eq!(m("almond_upstream_errors_total", &[("service", "m")]), 0.0);
    // Nothing is left in flight once every response has been read.
    assert_eq!(m("almond_requests_in_flight", &[("service", "m")]), 0.0);
    // Labels never carry request input: the unknown host is not a label.
    assert!(!text.contains("nosuch"), "request input in labels:\n{text}");
    assert_eq!(
        m(
            "almond_endpoints",
            &[("service", "m"), ("subset", "v1"), ("state", "healthy")]
        ),
        1.0
    );
}

#[tokio::test]
async fn ready_live_config_and_endpoints() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("orders")
                .http2()
                .lb("round_robin")
                .endpoint(a.addr, "v1", 3)
                .endpoint(b.addr, "v2", 1)
                .split(&[("v1", 90), ("v2", 10)]),
        )
        .start()
        .await;

    for path in ["/ready", "/live"] {
        let reply = proxy.admin_get(path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
    }
    assert_eq!(proxy.admin_get("/nope").await.status, StatusCode::NOT_FOUND);
    // Other methods: 405 naming the ones the path takes (RFC 9110: MUST).
    let mut admin = H1::connect(proxy.admin).await;
    for (path, allow) in [("/metrics", "GET, HEAD"), ("/tap", "GET")] {
        let post = http::Request::post(path)
            .header("host", proxy.admin.to_string())
            .body(empty())
            .unwrap();
        let reply = admin.request(post).await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(reply.header("allow"), Some(allow), "{path}");
    }

    let config = proxy.admin_get("/config").await;
    assert_eq!(config.status, StatusCode::OK);
    assert_eq!(config.header("content-type"), Some("application/json"));
    let config = config.json();
    let orders = &config["services"]["orders"];
    assert_eq!(orders["protocol"], "http2");
    assert_eq!(orders["lb"], "round_robin");
    assert_eq!(orders["endpoints"][0]["addr"], a.addr.to_string());
    assert_eq!(orders["endpoints"][1]["subset"], "v2");
    assert_eq!(orders["split"]["v2"], 10);

    let endpoints = proxy.admin_get("/endpoints").await;
    assert_eq!(endpoints.status, StatusCode::OK);
    let endpoints = endpoints.json();
    let orders = &endpoints["orders"];
    assert_eq!(orders["protocol"], "http2");
    let mut listed = Vec::new();
    for subset in orders["subsets"].as_array().expect("subsets") {
        for ep in subset["endpoints"].as_array().expect("endpoints") {
            listed.push((
                subset["subset"].as_str().unwrap().to_owned(),
                ep["addr"].as_str().unwrap().to_owned(),
                ep["weight"].as_u64().unwrap(),
            ));
        }
    }
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("v1".to_owned(), a.addr.to_string(), 3),
            ("v2".to_owned(), b.addr.to_string(), 1),
        ]
    );

    // After shutdown starts, the proxy stops answering.
    let admin = proxy.admin;
    proxy.shutdown().await;
    eventually("admin refuses connections after shutdown", || async {
        tokio::net::TcpStream::connect(admin).await.is_err()
    })
    .await;
}

/// The admin listener serves at most `MAX_CONNECTIONS_PER_PEER`
/// connections from one client address: past it a new connection is
/// closed unanswered (idle clients cannot take every file descriptor),
/// another address's health check still answers, and a place comes back
/// when a connection ends.
#[tokio::test]
async fn admin_connections_past_the_cap_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("cap").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("cap").endpoint(backend.addr, "v1", 1))
        .start()
        .await;
    let admin = proxy.admin;
    // `GET /ready` from source address `from`: the status line's start,
    // or what came back (nothing, for a connection closed unanswered).
    let ready_from = |from: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut c = socket.connect(admin).await.unwrap();
        let _ = c
            .write_all(b"GET /ready HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            .await;
        let mut got = vec![0u8; 12];
        let mut n = 0;
        while n < got.len() {
            match tokio::time::timeout(std::time::Duration::from_secs(5), c.read(&mut got[n..]))
                .await
                .expect("answered or closed at once, not left waiting")
            {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        got.truncate(n);
        String::from_utf8_lossy(&got).into_owned()
    };

    let mut held = Vec::new();
    for _ in 0..almond_proxy::admin::MAX_CONNECTIONS_PER_PEER {
        held.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    // The held connections are served: the last one answers.
    let last = held.last_mut().unwrap();
    last.write_all(b"GET /live HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    last.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");

    assert_eq!(
        ready_from("127.0.0.1").await,
        "",
        "over this address's cap: closed unanswered"
    );
    assert_eq!(
        ready_from("127.0.0.2").await,
        "HTTP/1.1 200",
        "another address has room"
    );

    drop(held.pop());
    eventually("a place comes back when a connection ends", || async {
        ready_from("127.0.0.1").await == "HTTP/1.1 200"
    })
    .await;
}
