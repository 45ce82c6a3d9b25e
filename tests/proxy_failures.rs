//! End to end: what a client sees when upstreams fail (refused, slow,
//! reset, overloaded) and when the request itself is malformed.

mod support;

use http::{Request, StatusCode};
use std::time::Duration;
use support::*;

/// No retries, so every count below is one try per request.
const NO_RETRIES: &str = "{ attempts: 0 }";

#[tokio::test]
async fn refused_endpoint_is_502_connect() {
    let dead = closed_port().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("dead").at(dead).set("retries", NO_RETRIES))
        .service(
            ServiceYaml::new("dead2")
                .http2()
                .at(dead)
                .set("retries", NO_RETRIES),
        )
        .start()
        .await;
    let reply = within("refused", get_h1(proxy.addr(), "dead", "/")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.header("x-almond-error"), Some("connect"));
    assert!(reply.text().contains("dead"), "{}", reply.text());

    let reply = H2::connect(proxy.addr()).await.get("dead2", "/").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.header("x-almond-error"), Some("connect"));
}

#[tokio::test]
async fn slow_backend_past_the_request_timeout_is_504() {
    let slow = Backend::builder("slow")
        .delay(Duration::from_secs(20))
        .start()
        .await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("slow")
                .at(slow.addr)
                .timeouts("1s", "200ms")
                .set("retries", NO_RETRIES),
        )
        .service(
            ServiceYaml::new("slow2")
                .http2()
                .at(slow.addr)
                .timeouts("1s", "200ms")
                .set("retries", NO_RETRIES),
        )
        .start()
        .await;
    // The backend would take 20 s; the proxy must answer long before.
    let bound = Duration::from_secs(10);
    let reply = tokio::time::timeout(bound, get_h1(proxy.addr(), "slow", "/"))
        .await
        .expect("the proxy answered within its request timeout, not the backend's delay");
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.header("x-almond-error"), Some("timeout"));

    let mut h2 = H2::connect(proxy.addr()).await;
    let reply = tokio::time::timeout(bound, h2.get("slow2", "/"))
        .await
        .expect("h2: answered within the request timeout");
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    // The client's connection outlives a timed-out stream.
    let reply = tokio::time::timeout(bound, h2.get("nosuch", "/"))
        .await
        .expect("h2 connection still serves");
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(slow.count(), 2);
}

#[tokio::test]
async fn backend_reset_mid_request_is_502_reset() {
    let resetter = Backend::builder("rst").reset().start().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("rst")
                .at(resetter.addr)
                .set("retries", NO_RETRIES),
        )
        .start()
        .await;
    let mut client = H1::connect(proxy.addr()).await;
    for _ in 0..3 {
        let reply = client.get("rst", "/").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert_eq!(reply.header("x-almond-error"), Some("reset"));
    }
    // Each request reached the backend before the reset.
    assert_eq!(resetter.count(), 3);
}

#[tokio::test]
async fn concurrency_limit_sheds_at_once_with_503_overloaded() {
    let slow = Backend::builder("slow")
        .delay(Duration::from_secs(2))
        .start()
        .await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("cb").at(slow.addr).max_requests(2))
        .start()
        .await;
    // Ten concurrent requests, each on its own connection; collect answers
    // in the order they complete.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..10 {
        let tx = tx.clone();
        let addr = proxy.addr();
        tokio::spawn(async move {
            let reply = get_h1(addr, "cb", "/").await;
            let _ = tx.send(reply);
        });
    }
    drop(tx);
    let mut order = Vec::new();
    while let Some(reply) = within("ten answers", rx.recv()).await {
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(reply.header("x-almond-overloaded"), Some("true"));
            assert_eq!(reply.header("x-almond-error"), Some("overloaded"));
        } else {
            assert_eq!(reply.status, StatusCode::OK);
        }
        order.push(reply.status);
    }
    assert_eq!(order.len(), 10);
    let shed = order
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    let served = order.iter().filter(|s| **s == StatusCode::OK).count();
    assert!(shed >= 1 && served >= 1, "{order:?}");
    // Never more than two at the backend at once, and the shed requests
    // never reached it.
    assert_eq!(slow.count(), served);
    // Shedding is immediate: the first answer is a 503, not a 2 s 200.
    assert_eq!(order[0], StatusCode::SERVICE_UNAVAILABLE, "{order:?}");

    // Once the slow ones finish, the service admits again.
    let reply = get_h1(proxy.addr(), "cb", "/").await;
    assert_eq!(reply.status, StatusCode::OK);
}

/// A proxy with a 16 KiB header limit in front of one echo backend.
async fn strict() -> (Backend, TestProxy) {
    let backend = Backend::start("m").await;
    let proxy = ProxyYaml::new()
        .top("limits: { max_header_bytes: 16384 }")
        .by_host()
        .service(ServiceYaml::new("m").at(backend.addr))
        .start()
        .await;
    (backend, proxy)
}

/// The proxy still answers a well-formed request.
async fn still_serves(proxy: &TestProxy) {
    let answer = raw(
        proxy.addr(),
        b"GET /after HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("x-backend: m"), "{answer}");
}

#[tokio::test]
async fn bad_header_line_is_400() {
    let (backend, proxy) = strict().await;
    let answer = raw(
        proxy.addr(),
        b"GET / HTTP/1.1\r\nHost: m\r\nthis line is not a header\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    let answer = raw(proxy.addr(), b"GET / HTTP/1.1\r\nHo st: m\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert_eq!(backend.count(), 0);
    // hyper answered them: counted, though they never reached the pipeline.
    eventually("both counted", || async {
        proxy_metric(&proxy, "almond_malformed_requests_total", &[]).await == 2.0
    })
    .await;
    still_serves(&proxy).await;
}

/// A target the request line admits and a URI does not (`<` in a path,
/// `"` in a query, a byte that is not UTF-8) is answered 400 at once, and
/// a request pipelined behind it is not taken for its answer.
#[tokio::test]
async fn a_target_that_is_no_uri_is_400() {
    let (backend, proxy) = strict().await;
    let targets: [&[u8]; 3] = [b"/<x>", b"/?q=\"a\"", b"/caf\xe9"];
    for target in targets {
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(target);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: m\r\n\r\nGET /next HTTP/1.1\r\nHost: m\r\n\r\n");
        let answer = raw(proxy.addr(), &req).await;
        let shown = String::from_utf8_lossy(target);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{shown}: {answer:?}");
        assert!(!answer.contains("200 OK"), "{shown}: {answer:?}");
    }
    assert_eq!(backend.count(), 0);
    still_serves(&proxy).await;
}

#[tokio::test]
async fn headers_over_the_limit_are_431() {
    let (backend, proxy) = strict().await;
    let mut req = b"GET / HTTP/1.1\r\nHost: m\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 20 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    let answer = raw(proxy.addr(), &req).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");
    assert_eq!(backend.count(), 0);
    eventually("the 431 counted", || async {
        proxy_metric(&proxy, "almond_malformed_requests_total", &[]).await == 1.0
    })
    .await;
    // Just under the limit is fine.
    let mut req = b"GET / HTTP/1.1\r\nHost: m\r\nConnection: close\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 12 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    let answer = raw(proxy.addr(), &req).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    still_serves(&proxy).await;
}

/// Over HTTP/2, a request head over `limits.max_header_bytes` gets 431
/// on its own stream, never reaches the upstream, and the connection
/// goes on serving the client's other requests.
#[tokio::test]
async fn an_h2_head_over_the_limit_is_431_and_the_connection_goes_on() {
    let (backend, proxy) = strict().await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let big = "a".repeat(20 * 1024);
    // A GET on the connection with an `x-big` field: its status.
    let get = |path: &'static str, value: String| {
        let send = send.clone();
        async move {
            let mut send = send.ready().await.unwrap();
            let req = Request::get(format!("http://m{path}"))
                .header("x-big", value)
                .body(())
                .unwrap();
            let (answer, _) = send.send_request(req, true).unwrap();
            let answer = tokio::time::timeout(Duration::from_secs(5), answer)
                .await
                .expect("answered")
                .unwrap();
            answer.status()
        }
    };
    let status = get("/big", big.clone()).await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(backend.count(), 0);
    // Just under the limit, on the same connection, is served.
    let status = get("/fits", big[..12 * 1024].to_owned()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn conflicting_lengths_are_400() {
    let (backend, proxy) = strict().await;
    // Two different Content-Lengths: which body is it?
    let answer = raw(
        proxy.addr(),
        b"POST / HTTP/1.1\r\nHost: m\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    // A Transfer-Encoding that does not end in chunked has no length.
    let answer = raw(
        proxy.addr(),
        b"POST / HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert_eq!(backend.count(), 0);
    still_serves(&proxy).await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_cannot_smuggle() {
    let (backend, proxy) = strict().await;
    // The classic CL.TE smuggle: a front end that trusted Content-Length
    // would forward the whole thing as one body; one that trusted
    // Transfer-Encoding would see a second request, `GET /smuggled`.
    let attack = b"POST /front HTTP/1.1\r\nHost: m\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: m\r\n\r\n";
    let answer = raw(proxy.addr(), attack).await;
    // hyper (1.12, proto/h1/role.rs) follows RFC 9112 6.3 here rather
    // than refusing: Transfer-Encoding wins, the Content-Length header is
    // removed, and the connection is closed after this one response. So
    // the proxy answers 200, not 400 -- and nothing is smuggled.
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    assert_eq!(
        answer.matches("HTTP/1.1 ").count(),
        1,
        "one answer: {answer:?}"
    );
    let seen = backend.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/front");
    assert_eq!(seen[0].body_len, 0, "the chunked body was empty");
    assert!(seen[0]
        .headers
        .get("content-length")
        .is_none_or(|v| v == "0"));
    assert!(seen.iter().all(|s| s.path != "/smuggled"));
    still_serves(&proxy).await;
    assert!(backend.seen().iter().all(|s| s.path != "/smuggled"));
}

#[tokio::test]
async fn two_hosts_or_a_host_against_the_target_are_400() {
    let (backend, proxy) = strict().await;
    for attack in [
        // Two Host headers (RFC 9112 3.2: MUST answer 400).
        &b"GET / HTTP/1.1\r\nHost: m\r\nHost: other\r\n\r\n"[..],
        &b"GET / HTTP/1.1\r\nHost: m\r\nHost: m\r\n\r\n"[..],
        // Absolute form routed to `m`, Host naming another service.
        &b"GET http://m/ HTTP/1.1\r\nHost: other\r\n\r\n"[..],
        // Not a host and port (RFC 9112 3.2: MUST answer 400): routing
        // would read `m`, an app building links `evil.example`.
        &b"GET / HTTP/1.1\r\nHost: m:80@evil.example\r\n\r\n"[..],
        &b"GET / HTTP/1.1\r\nHost: m:abc\r\n\r\n"[..],
        &b"GET http://u@m/ HTTP/1.1\r\nHost: u@m\r\n\r\n"[..],
        // `*` is for OPTIONS alone: no path for a guard or route to meet.
        &b"GET * HTTP/1.1\r\nHost: m\r\n\r\n"[..],
    ] {
        let answer = raw(proxy.addr(), attack).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
        // Closed at once (`raw` reads to the close): not after the idle
        // timeout.
        assert!(answer.contains("connection: close"), "{answer:?}");
        assert!(answer.contains("x-almond-error: bad-request"), "{answer:?}");
    }
    assert_eq!(backend.count(), 0);
    // Absolute form with a matching Host, and without one: the upstream
    // gets exactly one Host, the one routing used.
    for ok in [
        &b"GET http://m/abs HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"[..],
        &b"GET http://m/abs HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
    ] {
        let answer = raw(proxy.addr(), ok).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
        let seen = backend.last();
        assert_eq!(seen.path, "/abs");
        let hosts: Vec<_> = seen.headers.get_all("host").iter().collect();
        assert_eq!(hosts, ["m"], "{seen:?}");
    }
    still_serves(&proxy).await;
}

/// A transfer coding other than chunked (`gzip, chunked`): hyper undoes
/// the chunking only and the header is hop-by-hop, so the upstream would
/// get gzip bytes that nothing says are gzip. 501, as nginx answers, and
/// nothing goes up; `chunked` alone still goes through.
#[tokio::test]
async fn transfer_codings_other_than_chunked_are_501() {
    let (backend, proxy) = strict().await;
    for codings in [
        "gzip, chunked",
        "gzip\r\nTransfer-Encoding: chunked",
        "chunked, chunked",
        "chunked\r\nTransfer-Encoding: chunked",
    ] {
        let req = format!(
            "POST /up HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: {codings}\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let answer = raw(proxy.addr(), req.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 501 "), "{codings}: {answer:?}");
    }
    assert_eq!(backend.count(), 0);
    let chunked = b"POST /up HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let answer = raw(proxy.addr(), chunked).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    assert_eq!(backend.last().body_len, 5);
}

#[tokio::test]
async fn h2_host_against_authority_is_400() {
    let (backend, proxy) = strict().await;
    let mut client = H2::connect(proxy.addr()).await;
    let req = Request::builder()
        .uri("http://m/x")
        .header("host", "other")
        .body(empty())
        .unwrap();
    let reply = client.request(req).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(backend.count(), 0);
    let reply = client.get("m", "/x").await;
    assert_eq!(reply.status, StatusCode::OK);
}

/// A client that gives up while it streams its request body (it resets
/// its HTTP/2 stream) is the client's doing: the endpoint is not charged a
/// failure (one would eject it here), and no upstream reset is counted.
#[tokio::test]
async fn a_client_cancelling_its_upload_is_not_the_endpoint_s_failure() {
    let backend = Backend::builder("slow").hang().start().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("up")
                .at(backend.addr)
                .set("circuit_breaker", "{ consecutive_failures: 1 }")
                .set("retries", "{ attempts: 0 }"),
        )
        .start()
        .await;
    for _ in 0..3 {
        let req = Request::post("http://up/upload").body(()).unwrap();
        let (_conn, _answer, mut body) = h2_open(&proxy, req).await;
        body.send_data(bytes::Bytes::from_static(b"first part"), false)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        body.send_reset(h2::Reason::CANCEL);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = proxy.admin_get("/metrics").await.text();
    let resets = metric(
        &text,
        "almond_upstream_errors_total",
        &[("service", "up"), ("kind", "reset")],
    );
    assert_eq!(resets, 0.0, "{text}");
    let ejected = metric(
        &text,
        "almond_endpoints",
        &[("service", "up"), ("state", "ejected")],
    );
    assert_eq!(ejected, 0.0, "a healthy endpoint was ejected");
    assert_eq!(backend.count(), 3, "every upload reached the endpoint");
}

/// Timeouts charged to service `up`'s endpoints, with the metrics text.
async fn timeouts_charged(proxy: &TestProxy) -> (f64, String) {
    let text = proxy.admin_get("/metrics").await.text();
    let timeouts = metric(
        &text,
        "almond_upstream_errors_total",
        &[("service", "up"), ("kind", "timeout")],
    );
    (timeouts, text)
}

/// Opens an HTTP/2 connection to `proxy` and sends `req`'s head, its body
/// left open: the connection's handle (keep it for as long as the
/// stream), the answer to come and the body's sending half.
#[allow(clippy::unwrap_used)]
async fn h2_open(
    proxy: &TestProxy,
    req: Request<()>,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    h2::client::ResponseFuture,
    h2::SendStream<bytes::Bytes>,
) {
    let tcp = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let (answer, body) = send.send_request(req, false).unwrap();
    (send, answer, body)
}

/// Service `up`'s endpoint was charged no timeout, and is not ejected.
async fn endpoint_not_blamed(proxy: &TestProxy) {
    let (timeouts, text) = timeouts_charged(proxy).await;
    assert_eq!(timeouts, 0.0, "{text}");
    let ejected = metric(
        &text,
        "almond_endpoints",
        &[("service", "up"), ("state", "ejected")],
    );
    assert_eq!(ejected, 0.0, "a healthy endpoint was ejected");
}

/// A client uploading slowly, never idle for `body_idle` but still
/// sending when `timeouts.request` runs out, is not cut off: the
/// request's time counts from the end of its body (as Envoy's request
/// timeout starts once the request is whole). The endpoint waiting for
/// the body is not blamed: no timeout counted against it, no ejection.
#[tokio::test]
async fn a_slow_upload_past_the_request_timeout_is_answered() {
    let backend = Backend::start("reads").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("up")
                .at(backend.addr)
                .set("timeouts", "{ request: 600ms }")
                .set("circuit_breaker", "{ consecutive_failures: 1 }")
                .set("retries", "{ attempts: 0 }"),
        )
        .start()
        .await;
    for _ in 0..2 {
        let req = Request::post("http://up/upload").body(()).unwrap();
        let (_conn, answer, mut body) = h2_open(&proxy, req).await;
        // A part every 150 ms, for 1.5 s.
        let upload = tokio::spawn(async move {
            for _ in 0..10 {
                if body
                    .send_data(bytes::Bytes::from(vec![b'u'; 1024]), false)
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            let _ = body.send_data(bytes::Bytes::new(), true);
        });
        let answer = within("the answer", answer).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        upload.await.unwrap();
        assert_eq!(backend.last().body_len, 10 * 1024);
    }
    endpoint_not_blamed(&proxy).await;
    // A whole request in time is answered as ever.
    let reply = H1::connect(proxy.addr()).await.get("up", "/after").await;
    assert_eq!(reply.status, StatusCode::OK);
}

/// A gRPC call kept for a gRPC-code retry (streamed without a length,
/// kept as it goes) whose endpoint does not answer in time is the
/// endpoint's `timeout` (`DEADLINE_EXCEEDED` to the client), counted
/// against it, once the client has sent
/// its whole call: not the client's 408 (the kept copy used to hide the
/// upload's end).
#[tokio::test]
async fn a_kept_grpc_call_that_times_out_is_the_endpoint_s_504() {
    let backend = Backend::builder("slow")
        .delay(Duration::from_secs(2))
        .start()
        .await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("up")
                .http2()
                .at(backend.addr)
                .set("timeouts", "{ request: 400ms }")
                .set("retries", "{ on: [grpc-unavailable] }"),
        )
        .start()
        .await;
    let req = Request::post("http://up/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (_conn, answer, mut body) = h2_open(&proxy, req).await;
    body.send_data(bytes::Bytes::from_static(b"\0\0\0\0\x02hi"), true)
        .unwrap();
    let answer = within("the answer", answer).await.unwrap();
    // A gRPC client gets the 504 as gRPC's DEADLINE_EXCEEDED.
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.headers()["grpc-status"], "4");
    assert_eq!(answer.headers()["x-almond-error"], "timeout");
    let (timeouts, text) = timeouts_charged(&proxy).await;
    assert_eq!(timeouts, 1.0, "{text}");
}

/// An upstream that stops reading a large upload (the client has sent it,
/// the proxy cannot pass it on) is the upstream's 504 `timeout` when
/// `timeouts.request` runs out, as nginx and Envoy answer: the proxy was
/// not waiting on the client.
#[tokio::test]
async fn an_upstream_that_stops_reading_an_upload_is_the_upstream_s_504() {
    // Accepts, and never reads a byte.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("up")
                .at(addr)
                .set("timeouts", "{ request: 1s }"),
        )
        .start()
        .await;
    let req = Request::post("http://up/upload").body(()).unwrap();
    let (_conn, answer, mut body) = h2_open(&proxy, req).await;
    // 32 MiB, far past what loopback buffers hold; sent as the windows
    // allow, and given up when the answer comes.
    let upload = tokio::spawn(async move {
        for _ in 0..512 {
            body.reserve_capacity(64 * 1024);
            if body
                .send_data(bytes::Bytes::from(vec![b'u'; 64 * 1024]), false)
                .is_err()
            {
                return;
            }
            tokio::task::yield_now().await;
        }
    });
    let answer = within("the answer", answer).await.unwrap();
    assert_eq!(answer.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.headers()["x-almond-error"], "timeout");
    upload.abort();
}

/// The same with a small body kept for retries (read whole before the
/// first try): its last byte comes just before `timeouts.request`, the try
/// then has too little time left for an endpoint that answers in 100 ms.
/// The client's doing: a 408, the endpoint not blamed.
#[tokio::test]
async fn a_kept_body_that_came_late_is_the_client_s_timeout() {
    let backend = Backend::builder("slowish")
        .delay(Duration::from_millis(100))
        .start()
        .await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("up")
                .at(backend.addr)
                .set("timeouts", "{ request: 600ms }")
                .set("circuit_breaker", "{ consecutive_failures: 1 }"),
        )
        .start()
        .await;
    for _ in 0..2 {
        let req = Request::put("http://up/upload")
            .header("content-length", "10")
            .body(())
            .unwrap();
        let (_conn, answer, mut body) = h2_open(&proxy, req).await;
        body.send_data(bytes::Bytes::from_static(b"12345"), false)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(560)).await;
        body.send_data(bytes::Bytes::from_static(b"67890"), true)
            .unwrap();
        let answer = within("the answer", answer).await.unwrap();
        assert_eq!(answer.status(), StatusCode::REQUEST_TIMEOUT);
    }
    endpoint_not_blamed(&proxy).await;
}

/// A retry that would not have the time a try takes before the request's
/// deadline is not made: the client gets the upstream's 503 (and its
/// `Retry-After`), not a proxy 504, and the next endpoint is not sent a
/// request it cannot answer in time.
#[tokio::test]
async fn a_retry_without_time_for_a_try_is_not_made() {
    let slow = || {
        Backend::builder("busy")
            .status(503)
            .delay(Duration::from_millis(600))
            .start()
    };
    let (a, b) = (slow().await, slow().await);
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("busy")
                .endpoint(a.addr, "default", 1)
                .endpoint(b.addr, "default", 1)
                .timeouts("1s", "1s"),
        )
        .start()
        .await;
    let reply = H1::connect(proxy.addr()).await.get("busy", "/").await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        reply.headers
    );
    assert_eq!(
        reply.header("x-almond-error"),
        None,
        "the upstream's own answer"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        a.count() + b.count(),
        1,
        "a retry went out with no time for it"
    );
}
