//! Micro-benchmarks of the observability work each request does, without
//! sockets: stamping the request ID and trace context (a new trace, and a
//! client's trace continued) and handing a line to the access log.
//! Reported, never asserted: `cargo bench -p almond-proxy --bench observe`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use almond_proxy::observe::access_log::{AccessLog, Entry, Observed};
use almond_proxy::observe::metrics::Metrics;
use almond_proxy::observe::trace::Context;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use std::hint::black_box;

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("orders"));
    h.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_static(v));
    }
    h
}

fn bench(c: &mut Criterion) {
    let fresh = headers(&[]);
    for rate in [0.0, 0.01, 1.0] {
        c.bench_function(&format!("trace/new_trace_sample_rate_{rate}"), |b| {
            b.iter_batched_ref(
                || fresh.clone(),
                |h| black_box(Context::read(h, rate).stamp()),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    let traced = headers(&[
        ("x-request-id", "3f2c9a0e-7b1d-4c55-9e2a-1d2b3c4d5e6f"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("tracestate", "vendor=opaque"),
    ]);
    c.bench_function("trace/continue_client_trace", |b| {
        b.iter_batched_ref(
            || traced.clone(),
            |h| black_box(Context::read(h, 0.01).stamp()),
            criterion::BatchSize::SmallInput,
        )
    });

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let _guard = rt.enter();
    let metrics = match Metrics::new() {
        Ok(m) => m,
        Err(e) => panic!("metrics: {e}"),
    };
    let config = almond_config::AccessLog {
        format: almond_config::AccessLogFormat::Json,
        path: Some("/dev/null".into()),
        sample_rate: 1.0,
        max_per_second: u32::MAX,
        // Nobody drains the queue here (the runtime is not driven): after
        // it fills, this measures the drop path, the worst case.
        queue: 4096,
    };
    let Some(log) = AccessLog::start(&config, &metrics) else {
        panic!("access log");
    };
    let id = HeaderValue::from_static("3f2c9a0e7b1d4c559e2a1d2b3c4d5e6f");
    c.bench_function("access_log/admit_and_record", |b| {
        b.iter(|| {
            let now = tokio::time::Instant::now();
            if log.admits(now) {
                log.record(Entry {
                    time_ms: almond_net::now_ms(),
                    request_id: String::from_utf8_lossy(id.as_bytes()).into(),
                    trace_id: 1,
                    sampled: false,
                    method: Method::GET,
                    path: "/orders/7".into(),
                    status: 200,
                    duration_ms: 1.0,
                    bytes: None,
                    observed: Observed::default(),
                });
            }
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
