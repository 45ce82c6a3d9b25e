//! What an HTTP/2 request costs through almond's client connection
//! (`ours`) and through the `h2` crate's client (`h2`), both against the
//! same `h2` server on an in-memory connection, in batches of 16
//! concurrent streams (the bench's h2 shape). The server's work is in both
//! figures. Run under callgrind with two request counts and take the
//! difference, for instructions a request:
//!
//! ```sh
//! cargo build --release --example h2_client_cost -p almond-proxy
//! for n in 1600 17600; do valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n \
//!   target/release/examples/h2_client_cost ours $n; done
//! ```

use almond_proxy::http2::client::{self, Config};
use bytes::Bytes;
use futures_util::future::{join_all, poll_fn};
use http::{HeaderValue, Request, Response};

const BODY: &[u8] = b"hello, world\n";

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_default();
    let n: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(1600);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let bytes = runtime.block_on(async {
        let (io, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(serve(server));
        match which.as_str() {
            "ours" => ours(io, n).await,
            "h2" => theirs(io, n).await,
            _ => {
                eprintln!("usage: h2_client_cost ours|h2 N");
                std::process::exit(2);
            }
        }
    });
    println!("{which}: {n} requests, {bytes} body bytes");
}

/// The bench's upstream: 200 and a 13-byte body, `server` and `date` as
/// nginx sends them.
async fn serve(io: tokio::io::DuplexStream) {
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    while let Some(Ok((_req, mut respond))) = conn.accept().await {
        let resp = Response::builder()
            .header("server", "nginx/1.22.1")
            .header("date", "Mon, 07 Dec 2026 03:35:05 GMT")
            .header("content-type", "application/octet-stream")
            .header("content-length", "13")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        if let Ok(mut stream) = respond.send_response(resp, false) {
            let _ = stream.send_data(Bytes::from_static(BODY), true);
        }
    }
}

/// The request head as the proxy sends it upstream.
fn request(i: usize) -> Request<()> {
    let mut req = Request::get("http://127.0.0.1:28091/")
        .header("user-agent", "h2load nghttp2/1.52.0")
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    let id = format!("3f2a9c1e-8b4d-4e6f-9a01-{i:012x}");
    let mut id = HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("x"));
    id.set_sensitive(true);
    req.headers_mut().insert("x-request-id", id);
    let mut trace =
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    trace.set_sensitive(true);
    req.headers_mut().insert("traceparent", trace);
    req
}

async fn ours(io: tokio::io::DuplexStream, n: usize) -> usize {
    let (client, driver) = client::handshake(io, Config::default());
    tokio::spawn(driver);
    let mut total = 0;
    for batch in 0..n / 16 {
        let calls = (0..16).map(|j| {
            let client = client.clone();
            async move {
                let Ok((response, _body)) = client.send_request(&request(batch * 16 + j), true)
                else {
                    return 0;
                };
                let Ok(resp) = response.await else {
                    return 0;
                };
                let mut body = resp.into_body();
                let mut got = 0;
                while let Some(Ok(data)) = poll_fn(|cx| body.poll_data(cx)).await {
                    got += data.len();
                }
                got
            }
        });
        total += join_all(calls).await.into_iter().sum::<usize>();
    }
    total
}

async fn theirs(io: tokio::io::DuplexStream, n: usize) -> usize {
    let Ok((send, conn)) = h2::client::handshake(io).await else {
        return 0;
    };
    tokio::spawn(conn);
    let mut total = 0;
    for batch in 0..n / 16 {
        let calls = (0..16).map(|j| {
            let send = send.clone();
            async move {
                let Ok(mut ready) = send.ready().await else {
                    return 0;
                };
                let Ok((response, _body)) = ready.send_request(request(batch * 16 + j), true)
                else {
                    return 0;
                };
                let Ok(resp) = response.await else {
                    return 0;
                };
                let mut body = resp.into_body();
                let mut got = 0;
                while let Some(Ok(data)) = body.data().await {
                    let _ = body.flow_control().release_capacity(data.len());
                    got += data.len();
                }
                got
            }
        });
        total += join_all(calls).await.into_iter().sum::<usize>();
    }
    total
}
