//! Micro-benchmarks of the request path's own work, without sockets:
//! route (listener + Host -> service), split (subset pick), balance
//! (endpoint pick for each algorithm) and the golden-metric record.
//! Reported, never asserted: `cargo bench -p almond-proxy`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use almond_proxy::observe::metrics::Metrics;
use almond_proxy::outcome::CodeClass;
use almond_proxy::pipeline::route::Table;
use almond_proxy::upstream::balance::Tried;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use std::hint::black_box;
use std::sync::Arc;

fn table(lb: &str, split: bool) -> (Table, Metrics) {
    table_with(
        lb,
        if split {
            "    split: { v1: 90, v2: 10 }\n"
        } else {
            ""
        },
    )
}

fn table_with(lb: &str, split: &str) -> (Table, Metrics) {
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\nservices:\n  orders:\n    lb: {lb}\n    endpoints:\n      - {{ addr: 127.0.0.1:8001, subset: v1 }}\n      - {{ addr: 127.0.0.1:8002, subset: v1 }}\n      - {{ addr: 127.0.0.1:8003, subset: v1 }}\n      - {{ addr: 127.0.0.1:8004, subset: v2 }}\n{split}"
    );
    let config = match almond_config::load_proxy(&yaml, "bench") {
        Ok(c) => c,
        Err(e) => panic!("bench config: {e}"),
    };
    let metrics = match Metrics::new() {
        Ok(m) => m,
        Err(e) => panic!("metrics: {e}"),
    };
    let table = Table::build(Arc::new(config), &metrics, None);
    (table, metrics)
}

fn bench(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let _guard = rt.enter();
    let req = Request::get("/orders/42")
        .header("host", "orders:4140")
        .body(())
        .unwrap_or_default();

    for (lb, split) in [
        ("p2c_ewma", false),
        ("round_robin", false),
        ("least_request", false),
        ("p2c_ewma", true),
    ] {
        let (table, _metrics) = table(lb, split);
        let name = format!(
            "route+pick+record/{lb}{}",
            if split { "+split" } else { "" }
        );
        c.bench_function(&name, |b| {
            b.iter(|| {
                let Some(listener) = table.listener(0) else {
                    return;
                };
                let Ok(svc) = table.service(listener, black_box(&req)) else {
                    return;
                };
                let Ok(pool) = svc.pool(&req, None) else {
                    return;
                };
                let now = tokio::time::Instant::now();
                if let Some(member) = pool.pick(now, Tried::NONE) {
                    let metrics = &svc.subsets[member.subset].metrics[0];
                    metrics.record(CodeClass::Success, 0.0012);
                    black_box(member.state.addr);
                }
            })
        });
    }

    let (table, _metrics) = table("p2c_ewma", true);
    c.bench_function("split decision (90/10)", |b| {
        let Some(listener) = table.listener(0) else {
            return;
        };
        let Ok(svc) = table.service(listener, &req) else {
            return;
        };
        b.iter(|| black_box(svc.pool(black_box(&req), None).is_ok()))
    });

    // Sticky: the subset from a hash of the user's header value.
    let (table, _metrics) = table_with(
        "p2c_ewma",
        "    split: { v1: 90, v2: 10, sticky_header: x-user-id }\n",
    );
    let user = Request::get("/orders/42")
        .header("host", "orders:4140")
        .header("x-user-id", "user-7f3a9c21")
        .body(())
        .unwrap_or_default();
    c.bench_function("split decision (90/10, sticky x-user-id)", |b| {
        let Some(listener) = table.listener(0) else {
            return;
        };
        let Ok(svc) = table.service(listener, &user) else {
            return;
        };
        b.iter(|| black_box(svc.pool(black_box(&user), None).is_ok()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
