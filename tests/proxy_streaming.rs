//! End to end through the real binary: 100 MiB up and 100 MiB down stream
//! through the proxy, byte for byte, while its peak memory stays far below
//! the size of either body.

mod support;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::*;

const HUNDRED_MIB: u64 = 100 * 1024 * 1024;
/// The proxy's peak RSS must stay well below one body's size: buffering
/// either body whole would put it above 100 MiB.
const PEAK_LIMIT_KIB: u64 = 60 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_each_way_streams_with_bounded_memory() {
    let backend = Backend::start("big").await;
    let yaml = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("big").at(backend.addr))
        .service(ServiceYaml::new("big2").http2().at(backend.addr))
        .build();
    let proxy = ProxyProcess::start(&yaml).await;
    let at_start = proxy.peak_rss_kib();

    // Upload: an HTTP/1.1 chunked body of 100 MiB; the backend counts it.
    let mut client = H1::connect(proxy.addr()).await;
    let req = Request::post("/upload")
        .header("host", "big")
        .body(stream_of(HUNDRED_MIB))
        .unwrap();
    let reply = client.request(req).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["body_len"], HUNDRED_MIB);
    assert_eq!(backend.last().body_len, HUNDRED_MIB);
    assert!(
        backend.last().headers.get("transfer-encoding").is_some(),
        "streamed upstream chunked, not buffered to a length"
    );
    let after_upload = proxy.peak_rss_kib();

    // Download: 100 MiB from the backend, counted frame by frame here.
    let resp = client
        .send(h1_get("big", &format!("/bytes/{HUNDRED_MIB}")))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = 0u64;
    within("100 MiB download", async {
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.expect("download frame").data_ref() {
                received += data.len() as u64;
            }
        }
    })
    .await;
    assert_eq!(received, HUNDRED_MIB);

    // And down an h2c client from an HTTP/2 upstream (flow control both
    // sides).
    let mut h2 = H2::connect(proxy.addr()).await;
    let resp = h2
        .send(h2_get("big2", &format!("/bytes/{HUNDRED_MIB}")))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = 0u64;
    within("100 MiB h2 download", async {
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.expect("h2 download frame").data_ref() {
                received += data.len() as u64;
            }
        }
    })
    .await;
    assert_eq!(received, HUNDRED_MIB);

    let peak = proxy.peak_rss_kib();
    eprintln!(
        "almond proxy VmHWM: {at_start} KiB at start, {after_upload} KiB after 100 MiB up, \
         {peak} KiB after 100 MiB down twice (limit {PEAK_LIMIT_KIB} KiB)"
    );
    assert!(
        peak < PEAK_LIMIT_KIB,
        "proxy peak RSS {peak} KiB; it must stream, not buffer"
    );
}
